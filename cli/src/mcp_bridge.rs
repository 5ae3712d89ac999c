//! `banger mcp`: relays MCP between stdio and the daemon's socket, byte for byte. The daemon serves MCP
//! itself, so the bridge holds no state; its one addition is the options line it sends first (the toolsets
//! to list, `tools_schema::toolsets::McpSessionOptions`).
use std::path::Path;
use std::process::ExitCode;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

pub async fn run(socket: &Path, toolsets: Vec<tools_schema::toolsets::Toolset>) -> anyhow::Result<ExitCode> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the banger daemon at {} ({e})\n  hint: start it with `banger daemon start`",
            socket.display()
        )
    })?;
    let (mut rd, mut wr) = stream.into_split();
    let options = serde_json::json!({
        tools_schema::toolsets::MCP_OPTIONS_KEY: tools_schema::toolsets::McpSessionOptions { toolsets }
    });
    wr.write_all(format!("{options}\n").as_bytes()).await?;
    // stdin -> daemon runs on its own; when the client closes stdin the daemon sees EOF and ends the session.
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut wr).await;
        let _ = wr.shutdown().await;
    });
    // daemon -> stdout decides when the bridge ends: when the daemon closes, there is nothing left to relay.
    let mut stdout = tokio::io::stdout();
    let relayed = tokio::io::copy(&mut rd, &mut stdout).await;
    let _ = stdout.flush().await;
    upstream.abort();
    relayed?;
    Ok(ExitCode::SUCCESS)
}
