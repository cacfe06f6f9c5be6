//! The shutdown signal every task of the engine watches.

use tokio::sync::watch;

/// Resolves once the shutdown watch reads `true` (or its sender is gone).
pub async fn stopped(sd: &mut watch::Receiver<bool>) {
    let _ = sd.wait_for(|s| *s).await;
}
