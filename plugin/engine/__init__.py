"""The torch engine: fake quantizers, the fake-quantized model that freezes any plan
(:mod:`plugin.engine.fakequant`), the DNAS supernet of the gradient search
(:mod:`plugin.engine.supernet`), and training (:mod:`plugin.engine.training`: batches, task
losses, QAT, evaluation). Importing :mod:`plugin` does not import this package; strategies and
:mod:`plugin.api` import it when they train.
"""
