"""``visionpeft.methods`` is the subpackage of methods, and calling it lists the registered names (``vp.methods()``)."""
import importlib
import types

import visionpeft as vp
import visionpeft.methods.sara as sara_by_dotted_import
from visionpeft.methods import lora
from visionpeft.methods.base import registered_names


def test_the_attribute_is_the_subpackage_and_reaches_its_modules():
    assert isinstance(vp.methods, types.ModuleType)
    assert vp.methods is importlib.import_module("visionpeft.methods")
    assert vp.methods.lora is lora and vp.methods.sara is sara_by_dotted_import
    assert vp.methods.get_method("lora") is lora.LoRA


def test_calling_it_lists_every_registered_method():
    names = vp.methods()
    assert names == registered_names() and {"lora", "flora", "snella", "snell", "sara", "svd", "clip-svd"} <= set(names)
