"""Experiment runners: ``run(config, workdir)`` turns a config into data, model, method, the loop
and reports. The only modules below `launch.py` that read a config object.

``continual``: continual training of every method of ``config.methods`` on one stream.
``merge``: fine-tune experts from one base and merge them with every merge method.
"""
