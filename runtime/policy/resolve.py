"""A tool name to what runs: the admin's tool and the isolation profile it names. Pure.

The caller names a tool and can choose nothing else: image, command and profile come from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from toolcell.errors import ToolNotFound
from toolcell.model import Tool
from toolcell.policy.profile import IsolationProfile


@dataclass(frozen=True)
class ResolvedTool:
    tool: Tool
    profile: IsolationProfile


def resolve_tool(tools: Mapping[str, Tool], profiles: Mapping[str, IsolationProfile], name: str) -> ResolvedTool:
    """The tool called ``name`` and its profile; ``ToolNotFound`` for any other name."""
    tool = tools.get(name)
    if tool is None:
        raise ToolNotFound(name)
    return ResolvedTool(tool=tool, profile=profiles[tool.profile])
