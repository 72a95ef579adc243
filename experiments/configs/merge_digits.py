"""Model merging on sklearn digits: 8 experts from one base, every static and continual merge.

The small, embedded merge experiment (needs nothing beyond the pip requirements; the tests run a
cut-down copy of it). Protocol (see `cljax.runners.merge`): an MLP base is pretrained on 600
of the 1,257 training digits; the other 657 feed 8 tasks with their own heads: 2 class groups
(split, 5 classes each), 4 rotations (0, 90, 180, 270 degrees) and 2 pixel permutations. Per task
a linear probe on the frozen base (zero-shot reference) and an expert fine-tuned from it (LP-FT);
the backbones are merged with every method (heads excluded), each task evaluated with its own
head; continual merges in 10 random orders.

  python launch.py --config=experiments/configs/merge_digits.py --workdir=runs/merge_digits

This file is the reference for the merge config keys; merge_fashion_mnist.py starts from it.
``config.experiment = 'merge'`` makes launch.py call `cljax.runners.merge.run`.

Hyperparameters of the merges (the papers' defaults where they give one; not tuned here):
  * task_arithmetic: lambda = 0.3. Ilharco et al. (ICLR 2023) pick lambda on held-out data from
    [0, 1]; 0.3 is the usual choice for 8 tasks (FusionBench's default for 8 CLIP tasks).
  * ties: density (k) = 0.2, lambda = 1, global trim. Yadav et al. (NeurIPS 2023) Sec. 5: k = 20%
    and lambda = 1 as the defaults when no validation set is used.
  * dare: drop rate p = 0.5 with task arithmetic (lambda 0.3) and with TIES (lambda 1, no further
    trim). Yu et al. (ICML 2024) drop up to p = 0.9 in large language models and report that
    smaller models tolerate less; p = 0.5 is their smallest setting.
  * fisher: exact diagonal Fisher on 256 training examples per expert, floor 1e-6 (Matena &
    Raffel 2022, the ``fisher_floor`` of their code).
  * magmax: lambda = 0.5 (Marczak et al., ECCV 2024, choose lambda on held-out data; one selected
    entry per coordinate carries one task's full update, so we halve it as for 2+ tasks).
  * frank_wolfe: hard LMO on the task-vector cosine, 10 steps of 2/(t+2) (Chen et al., arXiv
    2503.12649, Alg. 1). Proxy loss: cross-entropy on ``num_heldout`` held-out LABELED training
    examples per task (never trained on), each task through its own head, averaged over tasks.
  * multislerp: equal weights, normalized, on the task vectors (mergekit's defaults).
    model_stock: one ratio per leaf (Jang et al., ECCV 2024, layer-wise). emr: no
    hyperparameters (Huang et al., NeurIPS 2024); each task evaluated with its own mask and
    rescaler. slerp and nuslerp interpolate two models, so they are not run on 8 experts.
  * breadcrumbs: gamma = 0.01 of the largest magnitudes dropped (mergekit's default), density
    0.15 kept, lambda 0.3 (as task arithmetic). Davari & Belilovsky (ECCV 2024) choose the
    band on held-out data; these are set, not tuned.
  * della: MagPrune with mean keep probability 0.5 (DARE's p = 0.5 here), epsilon 0.15
    (mergekit's default), rescaled by 1 / p_i, elect and disjoint mean, lambda 1 (as TIES).
  * tsv, iso_c, iso_cts: alpha = 1 (the authors' defaults; TSV keeps 1/T of each task's
    singular triplets, Iso-CTS a common space of 0.8).
  * consensus: Consensus task arithmetic, lambda_t = 0.6 (FusionBench's TALL-mask lambda), k = 2
    (Wang et al., ICML 2024), alpha 0.3 (as task arithmetic).
  * wudi: Adam, lr 1e-5, 300 steps per layer from the sum of the task vectors, added unscaled
    (the authors' code).
  * regmean: Grams of each expert's layer inputs on its ``num_heldout`` held-out examples,
    off-diagonals scaled by alpha = 0.95 (FusionBench's CLIP setting).
  * adamerging: layer-wise, lambda initialised to 0.3, Adam lr 1e-3, 500 steps (Yang et al.,
    ICLR 2024), entropy of each task's predictions on its unlabelled test inputs, 16 inputs per
    task per step.
  * soft_frank_wolfe: 10 iterations, layer-wise AdaMerging of 500 steps per iteration (the
    authors' fw_soft config), oracle gradients from each task's held-out cross-entropy, 16
    unlabelled test inputs per task per AdaMerging step.
  * continual_task_arithmetic: lambda = 0.3 (as static). continual_ties: lambda = 0.5, density
    0.2, disjoint sum (FusionBench's continual TIES configuration). opcm: alpha = 0.5 (Tang et
    al., arXiv 2501.09522, FusionBench's default).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = 'merge'  # launch.py: cljax.runners.merge.run rather than cljax.runners.continual.run
  c.name = 'merge_digits'
  # Data: 'digits' | 'fashion_mnist' | 'tfds:<name>'; data_dir '' = the source's default.
  c.dataset = 'digits'
  c.data_dir = ''
  c.seed = 0
  c.num_pretrain = 600  # training examples of the base; the rest build the tasks
  # Tasks: (stream kind, number of tasks) pairs, concatenated; each task has its own head.
  c.task_streams = (('split', 2), ('rotated', 4), ('permuted', 2))
  c.stream_kwargs = ml_collections.ConfigDict({'rotated': {'max_degrees': 360.0}})
  c.num_heldout = 32  # per task: held-out labeled examples (Frank-Wolfe's proxy loss)
  c.max_train = 0  # per task: at most this many training examples (0 = all the rest)
  c.max_test = 0  # per task: at most this many test examples (0 = all)
  # Model: the last layer `head` is each task's own head (never merged).
  c.model = 'mlp'
  c.model_kwargs = ml_collections.ConfigDict({'hidden': (64, 64), 'use_bias': True})
  c.exclude = 'head/.*'
  # Training: the base, the linear probes (head only), the experts (all weights, from the probe).
  c.pretrain = ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-3, 'momentum': 0.0, 'epochs': 20})
  c.probe = ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-2, 'momentum': 0.0, 'epochs': 20})
  c.finetune = ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-3, 'momentum': 0.0, 'epochs': 10})
  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_devices = 0  # 0 = all devices (data-parallel training and evaluation)
  # Merges.
  # Static and per-task (emr) merges.
  c.static_methods = ('average', 'task_arithmetic', 'ties', 'dare_task_arithmetic', 'dare_ties',
                      'fisher', 'magmax', 'frank_wolfe', 'multislerp', 'model_stock',
                      'breadcrumbs', 'della', 'tsv', 'iso_c', 'iso_cts', 'consensus', 'wudi',
                      'emr', 'regmean', 'adamerging', 'soft_frank_wolfe')
  c.continual_methods = ('continual_average', 'continual_task_arithmetic', 'continual_ties',
                         'opcm')
  c.num_orders = 10
  c.task_arithmetic = ml_collections.ConfigDict({'scaling': 0.3})
  c.ties = ml_collections.ConfigDict({'density': 0.2, 'scaling': 1.0, 'trim': 'global'})
  c.dare_task_arithmetic = ml_collections.ConfigDict({'drop_rate': 0.5, 'scaling': 0.3})
  c.dare_ties = ml_collections.ConfigDict(
      {'drop_rate': 0.5, 'scaling': 1.0, 'density': 1.0, 'trim': 'global'})
  c.fisher = ml_collections.ConfigDict(
      {'num_samples': 256, 'estimator': 'exact', 'batch_size': 32, 'epsilon': 1e-6})
  c.magmax = ml_collections.ConfigDict({'scaling': 0.5})
  c.frank_wolfe = ml_collections.ConfigDict(
      {'num_steps': 10, 'criterion': 'cosine', 'step_scale': 1.0})
  c.breadcrumbs = ml_collections.ConfigDict({'density': 0.15, 'gamma': 0.01, 'scaling': 0.3})
  c.della = ml_collections.ConfigDict({'density': 0.5, 'epsilon': 0.15, 'scaling': 1.0})
  c.tsv = ml_collections.ConfigDict({'scaling': 1.0})
  c.iso_c = ml_collections.ConfigDict({'scaling': 1.0})
  c.iso_cts = ml_collections.ConfigDict({'scaling': 1.0, 'common_space_fraction': 0.8})
  c.consensus = ml_collections.ConfigDict({'scaling': 0.3, 'lambdas': 0.6, 'k': 2})
  c.wudi = ml_collections.ConfigDict({'num_steps': 300, 'learning_rate': 1e-5})
  c.regmean = ml_collections.ConfigDict({'alpha': 0.95})
  c.adamerging = ml_collections.ConfigDict(
      {'granularity': 'layer', 'init': 0.3, 'num_steps': 500, 'learning_rate': 1e-3,
       'batch_size': 16})
  c.soft_frank_wolfe = ml_collections.ConfigDict(
      {'num_iterations': 10, 'ada_steps': 500, 'learning_rate': 1e-3, 'batch_size': 16})
  c.continual_task_arithmetic = ml_collections.ConfigDict({'scaling': 0.3})
  c.continual_ties = ml_collections.ConfigDict(
      {'scaling': 0.5, 'density': 0.2, 'trim': 'global', 'reduce': 'sum'})
  c.opcm = ml_collections.ConfigDict({'alpha': 0.5})
  return c
