//! Loading definitions: the ones shipped in `workflows/definitions/`, and YAML files from a
//! folder at run time, validated together into a [`Catalog`]; and [`publish`]ing them in the log,
//! so that runs keep the version they started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use stele_engine::{AppendRequest, CommandMeta, EventLog, LogError, NewEvent, StreamId};
use uuid::Uuid;

use crate::decide::Catalog;
use crate::definition::{validate, Definition, DefinitionError, Known, Problem};
use crate::runtime::RuntimeError;

/// The stream type definitions are recorded under.
pub const DEFINITION_TYPE: &str = "workflow_definition";

/// The definitions shipped with Stele, as (file name, YAML).
pub const BUILTIN: [(&str, &str); 5] = [
    (
        "assistant.yaml",
        include_str!("../definitions/assistant.yaml"),
    ),
    (
        "dev_pipeline.yaml",
        include_str!("../definitions/dev_pipeline.yaml"),
    ),
    (
        "neo_core.yaml",
        include_str!("../definitions/neo_core.yaml"),
    ),
    (
        "neo_subtask.yaml",
        include_str!("../definitions/neo_subtask.yaml"),
    ),
    ("bench.yaml", include_str!("../definitions/bench.yaml")),
];

/// The definition that takes a turn in a room (`room_turn`), shipped with the nodes that register
/// its `room.turn` tool (the binary's).
pub const ROOM_TURN: (&str, &str) = (
    "room_turn.yaml",
    include_str!("../definitions/room_turn.yaml"),
);

/// A definition's source: where it came from and its YAML.
#[derive(Clone, Debug)]
pub struct Source {
    pub file: PathBuf,
    pub yaml: String,
}

/// The shipped definitions.
pub fn builtin() -> Vec<Source> {
    shipped(&BUILTIN)
}

/// Sources of shipped definitions.
pub fn shipped(definitions: &[(&str, &str)]) -> Vec<Source> {
    definitions
        .iter()
        .map(|(name, yaml)| Source {
            file: Path::new("workflows/definitions").join(name),
            yaml: (*yaml).to_owned(),
        })
        .collect()
}

/// The `*.yaml` / `*.yml` files of a folder (or one file), in name order.
pub fn read(path: &Path) -> Result<Vec<Source>, DefinitionError> {
    let unreadable = |e: std::io::Error| DefinitionError {
        problems: vec![Problem {
            file: Some(path.to_path_buf()),
            workflow: None,
            step: None,
            message: format!("cannot be read: {e}"),
        }],
    };
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(unreadable)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|file| {
            let yaml = std::fs::read_to_string(&file).map_err(|e| DefinitionError {
                problems: vec![Problem {
                    file: Some(file.clone()),
                    workflow: None,
                    step: None,
                    message: format!("cannot be read: {e}"),
                }],
            })?;
            Ok(Source { file, yaml })
        })
        .collect()
}

/// Parses and validates `sources` together (a fan-out may name any of them) into a catalog;
/// every problem of every file is reported at once.
pub fn build(
    sources: &[Source],
    agents: &dyn Fn(&str) -> bool,
    tools: &dyn Fn(&str) -> bool,
) -> Result<Catalog, DefinitionError> {
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    for source in sources {
        match Definition::from_yaml(&source.yaml, Some(&source.file)) {
            Ok(definition) => parsed.push((source, definition)),
            Err(e) => problems.extend(e.problems),
        }
    }
    let names: Vec<String> = parsed.iter().map(|(_, d)| d.name.clone()).collect();
    let workflows = |name: &str| names.iter().any(|n| n == name);
    let known = Known {
        agents,
        tools,
        workflows: &workflows,
    };
    let mut catalog = Catalog::default();
    for (source, definition) in parsed {
        let found = validate(&definition, &known, Some(&source.file));
        if !found.is_empty() {
            problems.extend(found);
            continue;
        }
        if let Err(e) = catalog.insert(definition) {
            problems.extend(e.problems.into_iter().map(|p| Problem {
                file: Some(source.file.clone()),
                ..p
            }));
        }
    }
    if problems.is_empty() {
        Ok(catalog)
    } else {
        Err(DefinitionError { problems })
    }
}

/// Records the catalog's definitions in the log (stream `workflow_definition/<name>`), and
/// adds every version recorded before, so that runs started on a version that is no longer
/// in the files keep it. A version recorded with other content is refused.
pub async fn publish(log: &dyn EventLog, catalog: &mut Catalog) -> Result<(), RuntimeError> {
    let names: Vec<Arc<Definition>> = catalog.all().cloned().collect();
    let mut seen = std::collections::BTreeSet::new();
    for definition in &names {
        if !seen.insert(definition.name.clone()) {
            continue;
        }
        let stream = StreamId::new(DEFINITION_TYPE, &definition.name);
        for attempt in 0..5 {
            let stored = log.read_stream(&stream, 0).await?;
            let mut recorded = std::collections::BTreeSet::new();
            for event in &stored {
                let old: Definition = serde_json::from_value(event.payload["definition"].clone())
                    .map_err(|e| {
                    RuntimeError::Definitions(format!(
                        "stored definition {} is unreadable: {e}",
                        definition.name
                    ))
                })?;
                recorded.insert(old.version);
                catalog
                    .insert(old)
                    .map_err(|e| RuntimeError::Definitions(e.to_string()))?;
            }
            let new: Vec<NewEvent> = catalog
                .all()
                .filter(|d| d.name == definition.name && !recorded.contains(&d.version))
                .map(|d| NewEvent {
                    event_type: "DefinitionPublished".into(),
                    event_version: "1.0".into(),
                    payload: json!({ "version": d.version, "definition": **d }),
                    metadata: CommandMeta::new("workflow-runtime", "system")
                        .for_event(Uuid::now_v7()),
                })
                .collect();
            if new.is_empty() {
                break;
            }
            let request = AppendRequest {
                command_id: Uuid::now_v7(),
                stream: stream.clone(),
                expected_sequence: stored.last().map_or(0, |e| e.sequence),
                events: new,
            };
            match log.append(request).await {
                Ok(_) => break,
                Err(LogError::Conflict { .. }) if attempt < 4 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
