"""Agents (chat, ReAct, plan-and-execute), the ReAct parser, reasoning models' thinking, tools."""
