//! `RoleModels`: the models operators chose for agent roles at run time, for every task (one
//! stream, [`STREAM_ID`]). A role's chosen model is tried first, its configured route after it as
//! fallbacks; a chat's own choice (`/models`, `Conversation`'s `ModelChosen`) goes over it. That
//! the model is one of the role's is checked by the runtime, which knows the routes.

use std::collections::BTreeMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// The id of the one stream (`role_models/global`).
pub const STREAM_ID: &str = "global";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleModelsCommand {
    /// `model` (`provider/model`) first for `role`; `None`: the role's own route again.
    /// Choosing what is chosen already changes nothing.
    Choose { role: String, model: Option<String> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum RoleModelsEvent {
    RoleModelChosen { role: String, model: Option<String> },
}

impl DomainEvent for RoleModelsEvent {
    fn event_type(&self) -> String {
        match self {
            RoleModelsEvent::RoleModelChosen { .. } => "RoleModelChosen",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoleModelsError {
    #[error("a role's name is 1 to 64 visible characters")]
    InvalidRole,
}

/// The chosen models, by role.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleModels {
    pub chosen: BTreeMap<String, String>,
}

impl Aggregate for RoleModels {
    const TYPE: &'static str = "role_models";
    type Command = RoleModelsCommand;
    type Event = RoleModelsEvent;
    type Error = RoleModelsError;
    type Services = ();

    async fn handle(
        &mut self,
        command: RoleModelsCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), RoleModelsError> {
        let RoleModelsCommand::Choose { role, model } = command;
        if role.is_empty() || role.len() > 64 || role.chars().any(|c| c.is_control()) {
            return Err(RoleModelsError::InvalidRole);
        }
        let model = model.filter(|m| !m.trim().is_empty());
        if self.chosen.get(&role) == model.as_ref() {
            return Ok(());
        }
        sink.write(RoleModelsEvent::RoleModelChosen { role, model }, self)
            .await;
        Ok(())
    }

    fn apply(&mut self, event: RoleModelsEvent) {
        let RoleModelsEvent::RoleModelChosen { role, model } = event;
        match model {
            Some(model) => {
                self.chosen.insert(role, model);
            }
            None => {
                self.chosen.remove(&role);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<RoleModels>;

    fn chosen(role: &str, model: Option<&str>) -> RoleModelsEvent {
        RoleModelsEvent::RoleModelChosen {
            role: role.into(),
            model: model.map(str::to_owned),
        }
    }

    fn choose(role: &str, model: Option<&str>) -> RoleModelsCommand {
        RoleModelsCommand::Choose {
            role: role.into(),
            model: model.map(str::to_owned),
        }
    }

    #[test]
    fn a_choice_is_recorded_once_and_undone() {
        Given::with(())
            .given_no_previous_events()
            .when(choose("vox", Some("openai/gpt-4o")))
            .then_expect_events(vec![chosen("vox", Some("openai/gpt-4o"))]);
        Given::with(())
            .given(vec![chosen("vox", Some("openai/gpt-4o"))])
            .when(choose("vox", Some("openai/gpt-4o")))
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![chosen("vox", Some("openai/gpt-4o"))])
            .when(choose("vox", None))
            .then_expect_events(vec![chosen("vox", None)]);
        Given::with(())
            .given_no_previous_events()
            .when(choose("vox", None))
            .then_expect_events(vec![]);
        Given::with(())
            .given_no_previous_events()
            .when(choose("", Some("a/b")))
            .then_expect_error(RoleModelsError::InvalidRole);
    }
}
