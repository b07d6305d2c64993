//! Loading definitions: the ones shipped in `workflows/definitions/`, and YAML files from a
//! folder at run time, validated together into a [`Catalog`].

use std::path::{Path, PathBuf};

use crate::decide::Catalog;
use crate::definition::{validate, Definition, DefinitionError, Known, Problem};

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

/// A definition's source: where it came from and its YAML.
#[derive(Clone, Debug)]
pub struct Source {
    pub file: PathBuf,
    pub yaml: String,
}

/// The shipped definitions.
pub fn builtin() -> Vec<Source> {
    BUILTIN
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
