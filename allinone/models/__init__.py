"""Plain (non-elastic) models: the ESPnet-compatible Conformer encoder and the ASR model.

See docs/models.md.
"""

from allinone.models.asr import ASRModel, ASRModelConfig, CTC
from allinone.models.conformer import ConformerConfig, ConformerEncoder
from allinone.models.normalize import GlobalMVN

__all__ = ["ASRModel", "ASRModelConfig", "CTC", "ConformerConfig", "ConformerEncoder", "GlobalMVN"]
