//! `blixardctl apply -f FILE`: make the cluster's VMs match a file. The server computes the
//! plan (`/v1/plan`, with the scheduler's placements); the CLI prints it and, unless
//! `--dry-run`, carries it out with generation checks so a concurrent change is not
//! overwritten.

use std::path::Path;

use anyhow::Context;
use blixard_api::{validate, Client, Plan, PlanRequest, UpdateVm, VmSpec};
use serde::Deserialize;

use crate::output::{print_json, Format};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    vm: Vec<VmSpec>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonFile {
    List(Vec<VmSpec>),
    Object { vms: Vec<VmSpec> },
}

/// Reads the VM specs of a TOML (`[[vm]]`) or JSON (list, or `{"vms": [...]}`) file.
pub fn read_specs(path: &Path) -> anyhow::Result<Vec<VmSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let specs = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str::<TomlFile>(&text)
            .with_context(|| format!("{}", path.display()))?
            .vm
    } else {
        match serde_json::from_str::<JsonFile>(&text)
            .with_context(|| format!("{}", path.display()))?
        {
            JsonFile::List(v) | JsonFile::Object { vms: v } => v,
        }
    };
    for (i, s) in specs.iter().enumerate() {
        validate::vm_spec(s).map_err(|e| anyhow::anyhow!("{}: vm[{i}] {e}", path.display()))?;
    }
    Ok(specs)
}

fn print_plan(plan: &Plan) {
    let place = |host: &Option<String>, reason: &Option<String>| match (host, reason) {
        (Some(h), _) => format!("on {h}"),
        (None, Some(r)) => format!("stays pending: {r}"),
        (None, None) => String::new(),
    };
    for c in &plan.create {
        outln!("+ create {} {}", c.name, place(&c.host, &c.pending_reason));
    }
    for u in &plan.update {
        outln!(
            "~ update {} ({}) {}",
            u.name,
            u.changes.join(", "),
            place(&u.host, &u.pending_reason)
        );
    }
    for d in &plan.delete {
        outln!("- delete {}", d.name);
    }
    outln!(
        "{} to create, {} to change, {} to delete, {} unchanged",
        plan.create.len(),
        plan.update.len(),
        plan.delete.len(),
        plan.unchanged.len()
    );
}

pub async fn run(
    client: &Client,
    out: Format,
    file: &Path,
    prune: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    let specs = read_specs(file)?;
    let plan = client
        .plan(&PlanRequest {
            vms: specs.clone(),
            prune,
        })
        .await?;
    match out {
        Format::Json => print_json(&plan),
        Format::Table => print_plan(&plan),
    }
    if dry_run {
        return Ok(());
    }
    let by_name = |n: &str| specs.iter().find(|s| s.name == n).cloned();
    for c in &plan.create {
        if let Some(spec) = by_name(&c.name) {
            client
                .create_vm_idempotent(
                    &spec,
                    &format!("apply-{}-{}", spec.name, std::process::id()),
                )
                .await
                .with_context(|| format!("creating {}", spec.name))?;
        }
    }
    for u in &plan.update {
        if let Some(spec) = by_name(&u.name) {
            client
                .update_vm(&UpdateVm {
                    spec,
                    expected_generation: u.generation,
                })
                .await
                .with_context(|| format!("updating {}", u.name))?;
        }
    }
    for d in &plan.delete {
        let r = match d.generation {
            Some(g) => client.delete_vm_at(&d.name, g).await,
            None => client.delete_vm(&d.name).await,
        };
        r.with_context(|| format!("deleting {}", d.name))?;
    }
    if out == Format::Table {
        outln!("applied");
    }
    Ok(())
}
