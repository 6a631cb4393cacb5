"""Import / export of models from other toolkits (ESPnet2 for now)."""

from allinone.interop.espnet import load_espnet_asr

__all__ = ["load_espnet_asr"]
