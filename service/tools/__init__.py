"""Tools for the agents: the registry, the built-ins, and loading a deployer's own."""

from .base import Tool, ToolRegistry, load_tool_modules, tool
from .builtin import BUILTIN_TOOLS, calculate

__all__ = ["BUILTIN_TOOLS", "Tool", "ToolRegistry", "calculate", "load_tool_modules", "tool"]
