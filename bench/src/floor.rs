//! The raw restore floor shared by the benches: QEMU driven directly over
//! QMP (`-incoming defer`, the capability, the stream, `cont`), none of the
//! worker's start path.

use fastvm_worker::qmp::Qmp;
use std::path::Path;
use std::time::Duration;

/// Load `memory` into a QEMU started with `-incoming defer` and let it run.
pub async fn raw_incoming_and_cont(qmp: &Qmp, memory: &Path) -> anyhow::Result<()> {
    // The same capability and stream QEMU needs whoever drives it.
    qmp.execute(
        "migrate-set-capabilities",
        Some(
            serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        ),
    )
    .await?;
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({"uri": format!("exec:cat {}", memory.display())})),
    )
    .await?;
    loop {
        let st = qmp.execute("query-status", None).await?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("paused") | Some("postmigrate") => break,
            Some("inmigrate") | Some("prelaunch") => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            other => anyhow::bail!("raw restore ended in {other:?}"),
        }
    }
    qmp.execute("cont", None).await?;
    Ok(())
}
