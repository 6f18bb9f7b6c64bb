"""reacher-three-easy / -hard: a three-link planar reacher (our own model file) with the stock task."""
from dm_control.rl import control
from dm_control.suite import common
from dm_control.suite import reacher as stock

_ARM_STOCK_START = '<body name="arm" pos="0 0 .01">'
_ARM_THREE = """<body name="arm0" pos="0 0 .01">
      <geom name="arm0" type="capsule" fromto="0 0 0 0.09 0 0" size=".01" material="self"/>
      <joint name="shoulder0"/>
      <body name="arm1" pos=".09 0 0">
        <geom name="arm1" type="capsule" fromto="0 0 0 0.09 0 0" size=".01" material="self"/>
        <joint name="shoulder1" limited="true" range="-80 80"/>
        <body name="hand" pos=".09 0 0">
          <geom name="hand" type="capsule" fromto="0 0 0 0.1 0 0" size=".01" material="self"/>
          <joint name="wrist" limited="true" range="-80 80"/>
          <body name="finger" pos=".09 0 0">
            <camera name="hand" pos="0 0 .2" mode="track"/>
            <geom name="finger" type="sphere" size=".01" material="effector"/>
          </body>
        </body>
      </body>
    </body>"""
_ACTUATORS_THREE = """<actuator>
    <motor name="shoulder0" joint="shoulder0"/>
    <motor name="shoulder1" joint="shoulder1"/>
    <motor name="wrist" joint="wrist"/>
  </actuator>"""


def model():
    """The stock reacher.xml with its two-link arm and actuators replaced by three links."""
    xml = common.read_model("reacher.xml")
    xml = xml.decode() if isinstance(xml, bytes) else xml
    start = xml.find(_ARM_STOCK_START)
    target = xml.find("<!-- Target -->")
    a0, a1 = xml.find("<actuator>"), xml.find("</actuator>")
    if min(start, target, a0, a1) < 0:
        raise RuntimeError("dm_control's reacher.xml changed: cannot derive the three-link reacher")
    xml = xml[:start] + _ARM_THREE + "\n    " + xml[target:]
    a0, a1 = xml.find("<actuator>"), xml.find("</actuator>")
    xml = xml[:a0] + _ACTUATORS_THREE + xml[a1 + len("</actuator>"):]
    return xml, common.ASSETS


def _make(target_size, random):
    physics = stock.Physics.from_xml_string(*model())
    return control.Environment(physics, stock.Reacher(target_size=target_size, random=random),
                               time_limit=stock._DEFAULT_TIME_LIMIT)


def three_easy(random=None):
    return _make(stock._BIG_TARGET, random)


def three_hard(random=None):
    return _make(stock._SMALL_TARGET, random)
