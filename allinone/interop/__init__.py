"""Import / export of models from other toolkits (ESPnet2 for now)."""

from allinone.interop.espnet import export_espnet_asr, load_espnet_asr

__all__ = ["load_espnet_asr", "export_espnet_asr"]
