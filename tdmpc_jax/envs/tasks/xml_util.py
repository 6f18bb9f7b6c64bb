"""Derive a custom MuJoCo model from a stock dm_control suite XML by one exact string edit."""
from dm_control.suite import common


def stock_model_with(filename: str, old: str, new: str):
    """(xml, assets) of suite `filename` with `old` replaced by `new`; fails loudly if `old` is absent."""
    xml = common.read_model(filename)
    if isinstance(xml, bytes):
        xml = xml.decode()
    if xml.count(old) != 1:
        raise RuntimeError(f"dm_control's {filename} changed: cannot find {old!r} to derive the custom model")
    return xml.replace(old, new), common.ASSETS
