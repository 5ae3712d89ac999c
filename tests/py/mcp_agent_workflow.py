"""The canonical agent task through the official Python MCP SDK, over `banger mcp` (stdio), in five calls:
put a host repository in a new sandbox, run its failing test, fix the bug and test again, start a
long-running process and talk to it, then bring the work back as a patch checked against the host
repository, deleting the sandbox once the patch is safe.

Usage: mcp_agent_workflow.py BANGER_BINARY SOCKET REPO
Prints one JSON object describing what happened; the Rust test (tests/tests/agent_workflow.rs) checks it.
"""
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main(banger: str, socket: str, repo: str) -> dict:
    report: dict = {"progress": [], "calls": []}
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
                # What the agent reads: the structured result (the text block repeats it as JSON).
                report["calls"].append({"tool": name, "bytes": len(json.dumps(result.structured_content))})
                return result.structured_content

            async def on_progress(progress, total, message):
                report["progress"].append({"progress": progress, "total": total, "message": message})

            # 1. A sandbox with the repository in it.
            run = await call("vm_run", {"path": repo, "create": {"name": "pyagent", "memory_mib": 256}}, on_progress)
            report["vm_state"] = run["vm"]["state"]
            report["base_commit"] = run["workspace"]["base_commit"]
            # 2. The failing test.
            failing = await call("vm_exec", {"vm": "pyagent", "cwd": "/root/repo", "command": ["./test.sh"]})
            report["failing"] = {"exit_code": failing["exit_code"], "stdout": failing["stdout"]}
            # 3. The fix, and the test again, in one command.
            fixed = await call(
                "vm_exec",
                {
                    "vm": "pyagent",
                    "cwd": "/root/repo",
                    "command": ["sh", "-c", "sed -i 's/- \\$2/+ $2/' add.sh && ./test.sh"],
                },
            )
            report["fixed"] = {"exit_code": fixed["exit_code"], "stdout": fixed["stdout"]}
            # 4. A long-running process, talked to as it starts.
            server_cmd = ["sh", "-c", 'while read line; do echo "got $line"; done']
            started = await call(
                "session_start",
                {"vm": "pyagent", "name": "echo", "command": server_cmd, "input": "ping\n", "wait_ms": 20000},
            )
            report["session_state"] = started["state"]
            report["session_output"] = "".join(c["data"] for c in (started.get("output") or {}).get("chunks", []))
            # 5. The work back as a patch, checked against the host repository; the sandbox goes once it is safe.
            exported = await call("workspace_export", {"vm": "pyagent", "check_repo": repo, "delete": True})
            report["files"] = exported["files"]
            report["patch"] = exported.get("patch")
            report["check"] = exported.get("check")
            report["deleted"] = exported["deleted"]
            report["base_commit_used"] = exported["base_commit"]

            # Not part of the task: a typed error, as an agent sees it.
            missing = await session.call_tool("vm_exec", {"vm": "pyagent", "command": ["true"]})
            report["missing_error"] = json.loads(missing.content[0].text) if missing.is_error else None
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
