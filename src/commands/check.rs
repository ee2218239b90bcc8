//! `check`: what the exporter finds in the gateway's database, without serving anything.

use anyhow::Result;

use super::reconcile::open_db;
use crate::cli::DbArgs;
use crate::schema::Schema;

pub fn run(args: &DbArgs) -> Result<()> {
    let mut src = open_db(args)?;
    let schema = Schema::detect(&mut src)?;
    println!("database: {}", src.describe());
    println!("gateway:  {}", schema.generation.describe());
    let optional = ["channel_id", "group", "use_time", "other", "request_id"];
    let missing: Vec<_> = optional.iter().filter(|c| !schema.logs.has(c)).collect();
    if !missing.is_empty() {
        println!("logs lacks optional columns (labels degrade): {missing:?}");
    }
    for (table, cols) in [
        ("quota_data", &schema.quota_data),
        ("channels", &schema.channels),
        ("options", &schema.options),
    ] {
        println!(
            "{table}: {}",
            if cols.is_some() { "present" } else { "absent" }
        );
    }
    let top = src.logs().query("SELECT MAX(id) FROM logs", &[])?;
    println!(
        "highest logs.id: {}",
        top.first()
            .and_then(|r| r.first())
            .map(|v| v.to_label())
            .unwrap_or_default()
    );
    Ok(())
}
