"""Role locator: which parameter is attention, FFN, router, experts, ... and in which layer."""
from costlens.roles.locate import locate_roles
from costlens.roles.types import Architecture, AttentionBlock, FFNUnit, ParamUse, Role, RoleMap, Router

__all__ = ["locate_roles", "Architecture", "AttentionBlock", "FFNUnit", "ParamUse", "Role", "RoleMap", "Router"]
