"""The whole agent workflow through the official Python MCP SDK, over `banger mcp` (stdio).

Usage: mcp_agent_workflow.py BANGER_BINARY SOCKET REPO
Prints one JSON object describing what happened; the Rust test (tests/tests/agent_workflow.rs) checks it.
"""
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main(banger: str, socket: str, repo: str) -> dict:
    report: dict = {"progress": []}
    server = StdioServerParameters(command=banger, args=["mcp"], env={"BANGER_SOCKET": socket})
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            report["server"] = init.server_info.name
            tools = await session.list_tools()
            report["tools"] = sorted(t.name for t in tools.tools)

            async def call(name: str, args: dict, progress=None) -> dict:
                result = await session.call_tool(name, args, progress_callback=progress)
                if result.is_error:
                    raise RuntimeError(f"{name} failed: {result.content[0].text}")
                return result.structured_content

            async def on_progress(progress, total, message):
                report["progress"].append({"progress": progress, "total": total, "message": message})

            vm = await call("vm_create", {"name": "pyagent", "memory_mib": 256}, on_progress)
            report["vm_state"] = vm["state"]
            prep = await call("workspace_prepare", {"vm": "pyagent", "path": repo})
            report["base_commit"] = prep["base_commit"]
            script = (
                "cd /root/repo\n"
                "while read line; do\n"
                '  if [ "$line" = done ]; then git add -A && git commit -qm "from the agent" && echo committed; exit 0; fi\n'
                '  echo "$line" >> notes.txt && echo "noted $line"\n'
                "done\n"
            )
            started = await call("session_start", {"vm": "pyagent", "name": "worker", "command": ["sh", "-c", script], "cwd": "/root/repo"})
            report["session_state"] = started["state"]
            for line in ["alpha", "beta", "done"]:
                await call("session_send", {"session": "worker", "vm": "pyagent", "data": line + "\n"})
            # Follow the output without polling in a loop of our own: each read waits for what arrives next.
            text, offset = "", 0
            for _ in range(50):
                logs = await call("session_logs", {"session": "worker", "vm": "pyagent", "offset": offset, "wait_ms": 5000})
                text += "".join(c["data"] for c in logs["chunks"])
                offset = logs["next_offset"]
                if "committed" in text and logs["state"] != "running":
                    break
            report["session_output"] = text
            exported = await call("workspace_export", {"vm": "pyagent"})
            report["files"] = exported["files"]
            report["patch"] = exported.get("patch")
            report["base_commit_used"] = exported["base_commit"]
            deleted = await call("vm_delete", {"vm": "pyagent"})
            report["deleted"] = deleted
            # A typed error, as an agent sees it.
            missing = await session.call_tool("vm_show", {"vm": "pyagent"})
            report["missing_error"] = json.loads(missing.content[0].text) if missing.is_error else None
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
