"""Supernet: subnets, search spaces and subnet strings, quantizers, importance, extraction.

See docs/supernet.md. Extraction lives in ``allinone.elastic.extract`` (imported on its own:
it depends on the models, which depend on the leaf modules exported here).
"""

from allinone.elastic.quant import QuantConfig, add_quantizers, init_quantizers, quantizable_layers
from allinone.elastic.space import SearchSpace, load_grid, load_space
from allinone.elastic.subnet import KINDS, LayerChoice, SubnetConfig, module_kind

__all__ = ["SubnetConfig", "LayerChoice", "KINDS", "module_kind", "SearchSpace", "load_space", "load_grid",
           "QuantConfig", "add_quantizers", "init_quantizers", "quantizable_layers"]
