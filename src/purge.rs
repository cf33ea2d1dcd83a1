//! `loupe purge`: deletes everything stored for one project (its blocks and deletion
//! records). The operator runs it as a Job when a TraceProject with
//! `deletionPolicy: Delete` is deleted; off Kubernetes it is the same command.

use std::time::Duration;

use anyhow::Context;
use loupe_core::TenantId;
use loupe_core::storage::Storage;

use crate::server::parse_duration;

#[derive(clap::Args)]
pub struct Args {
    /// The storage the project's blocks are in: a directory, `file://` or `s3://` URL.
    #[arg(long, env = "LOUPE_STORAGE")]
    storage: String,
    /// The project whose data goes (`<namespace>/<project>`).
    #[arg(long)]
    tenant: TenantId,
    /// Wait this long before deleting, so that spans the writers still hold for the
    /// project are flushed first and deleted with the rest (the operator passes a
    /// few flush intervals, after the receivers stopped accepting the project).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    settle: Duration,
    /// Delete. Without it, only say what would be deleted.
    #[arg(long)]
    yes: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let storage = Storage::open(&args.storage)
        .with_context(|| format!("opening storage {}", args.storage))?;
    let tenant = &args.tenant;
    if !args.yes {
        let (blocks, _) = storage.list_blocks().await.context("listing blocks")?;
        let (count, spans, bytes) = loupe_core::storage::visible(blocks)
            .iter()
            .filter(|b| &b.tenant == tenant)
            .fold((0u64, 0u64, 0u64), |(c, s, b), m| {
                (c + 1, s + m.spans, b + m.size_bytes)
            });
        println!(
            "dry run: would delete {} ({spans} spans, {:.1} MB) and the deletion records of {tenant} in {}; nothing deleted. Add --yes to delete.",
            blocks_word(count),
            bytes as f64 / 1e6,
            storage.url()
        );
        return Ok(());
    }
    if !args.settle.is_zero() {
        tracing::info!(
            %tenant,
            settle = ?args.settle,
            "waiting for the writers to flush before deleting"
        );
        tokio::time::sleep(args.settle).await;
    }
    let purge = loupe_core::deletion::purge_tenant(&storage, tenant)
        .await
        .with_context(|| format!("deleting the data of {tenant}"))?;
    tracing::info!(%tenant, blocks = purge.blocks, objects = purge.objects, "project data deleted");
    println!(
        "deleted {} ({} objects) of {tenant} from {}",
        blocks_word(purge.blocks),
        purge.objects,
        storage.url()
    );
    Ok(())
}

fn blocks_word(n: u64) -> String {
    format!("{n} block{}", if n == 1 { "" } else { "s" })
}
