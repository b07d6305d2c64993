//! Rooms: several agents and people in one conversation (the `Room` aggregate). The runtime takes
//! an agent's turn: who speaks (the room's policy; under a moderator agent, that agent is asked
//! whom to give the floor), what it says (its role's models, its personality as the system
//! prompt, the room's recent messages as the prompt), recorded as `AgentSpoke`. A turn runs when
//! asked (`stele rooms turn`) or from a schedule of the shipped `room_turn` workflow, whose `tool`
//! step (`room.turn`) calls [`Runtime::room_turn`] — so agents go on without a person.

use stele_aggregates::room::{Room, RoomCommand, RoomError, Seat, SpeechCall, TurnPolicy};
use stele_models::{CallOverrides, ChatMessage, ModelRoute, ModelRouter};

use super::*;

/// Messages of the room an agent is shown when it speaks.
pub const ROOM_HISTORY: usize = 20;
/// Tokens of what an agent remembers, put before its prompt.
pub const ROOM_MEMORY_TOKENS: u32 = 200;

/// What one turn did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Turn {
    pub agent: String,
    pub text: String,
    /// `provider/model` that answered.
    pub model: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

impl Runtime {
    /// The room `name` (an error when there is none).
    pub async fn room(&self, name: &str) -> Result<Room, RuntimeError> {
        let (room, version) = self.rooms.load(name).await?;
        if version == 0 {
            return Err(RuntimeError::Room(RoomError::NotCreated));
        }
        Ok(room)
    }

    /// Runs a room command (creation checks that the seats' roles exist).
    pub async fn room_command(
        &self,
        name: &str,
        command: RoomCommand,
        meta: CommandMeta,
    ) -> Result<(), RuntimeError> {
        if let RoomCommand::Create { agents, .. } = &command {
            if let Some(seat) = agents.iter().find(|s| !self.agents.knows(&s.role)) {
                return Err(RuntimeError::UnknownModel(format!(
                    "agent {} of the room has the role {:?}, which is not configured",
                    seat.name, seat.role
                )));
            }
            for seat in agents {
                if let (Some(model), Some(router)) = (&seat.model, self.agents.router()) {
                    seat_route(router, model).map_err(|why| {
                        RuntimeError::UnknownModel(format!("agent {}: {why}", seat.name))
                    })?;
                }
            }
        }
        let result = if matches!(command, RoomCommand::Create { .. }) {
            self.rooms.create(name, command, meta).await
        } else {
            self.rooms.execute(name, command, meta).await
        };
        match result {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Room(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// One agent's turn in room `name`; `None` when no agent may speak (all muted or removed)
    /// or the hour's turns are used.
    pub async fn room_turn(
        &self,
        name: &str,
        meta: CommandMeta,
    ) -> Result<Option<Turn>, RuntimeError> {
        let room = self.room(name).await?;
        if room.turns_left(self.clock.utc()) == 0 {
            return Ok(None);
        }
        let Some(router) = self.agents.router() else {
            return Err(RuntimeError::UnknownModel(
                "this node calls no models".into(),
            ));
        };
        let speaker = match (&room.policy, room.next_speaker()) {
            (TurnPolicy::Moderator { agent }, _) => {
                let others: Vec<&Seat> = room
                    .speakers()
                    .into_iter()
                    .filter(|s| &s.name != agent)
                    .collect();
                if others.is_empty() {
                    return Ok(None);
                }
                let Some(moderator) = room.agents.iter().find(|s| &s.name == agent) else {
                    return Ok(None);
                };
                let names: Vec<&str> = others.iter().map(|s| s.name.as_str()).collect();
                let ask = format!(
                    "{}\n\nWho should speak next? Answer with one name only, among: {}.",
                    transcript(&room),
                    names.join(", ")
                );
                let reply = router
                    .call(
                        &moderator.role,
                        vec![ChatMessage::user(ask)],
                        &CallOverrides {
                            system_prompt: Some(personality(&room, moderator)),
                            route: self.route_of(router, moderator).await?,
                            ..CallOverrides::default()
                        },
                    )
                    .await;
                let picked = reply.result.ok().map(|r| r.content).unwrap_or_default();
                // The name the moderator said last (its answer may quote the room before it).
                // Otherwise the next in seat order.
                let round = room
                    .agents
                    .iter()
                    .cycle()
                    .skip(room.turns as usize % room.agents.len())
                    .take(room.agents.len())
                    .find(|seat| names.contains(&seat.name.as_str()))
                    .map(|seat| seat.name.clone());
                names
                    .iter()
                    .filter_map(|name| picked.rfind(*name).map(|at| (at, *name)))
                    .max()
                    .map(|(_, name)| name.to_owned())
                    .or(round)
            }
            (_, next) => next,
        };
        let Some(speaker) = speaker else {
            return Ok(None);
        };
        let seat = room
            .agents
            .iter()
            .find(|s| s.name == speaker)
            .cloned()
            .expect("the speaker is seated");
        // The person it answers (the last who spoke with a subject): its words are theirs too.
        let answers = room
            .lines
            .iter()
            .rev()
            .find(|l| !l.agent)
            .and_then(|l| l.text.subject())
            .map(str::to_owned);
        let prompt = format!(
            "{}{}\n\nIt is your turn, {}. Say what you add, in a few sentences.",
            self.remembered(&room, &seat, answers.clone()).await,
            transcript(&room),
            seat.name
        );
        let started = std::time::Instant::now();
        let reply = router
            .call(
                &seat.role,
                vec![ChatMessage::user(prompt)],
                &CallOverrides {
                    system_prompt: Some(personality(&room, &seat)),
                    route: self.route_of(router, &seat).await?,
                    ..CallOverrides::default()
                },
            )
            .await;
        let latency_ms = started.elapsed().as_millis() as u64;
        let answered = reply
            .calls
            .iter()
            .rev()
            .find(|c| c.error.is_none())
            .map(|c| format!("{}/{}", c.provider, c.model))
            .unwrap_or_default();
        let response = reply
            .result
            .map_err(|e| RuntimeError::ModelsFailed(e.to_string()))?;
        let text: String = response
            .content
            .chars()
            .take(stele_aggregates::room::MAX_MESSAGE_CHARS)
            .collect();
        let text = if text.trim().is_empty() {
            "(says nothing)".to_owned()
        } else {
            text
        };
        let speak = RoomCommand::Speak {
            agent: seat.name.clone(),
            turn: room.turns,
            text: text.clone(),
            at: self.clock.utc(),
            call: Some(SpeechCall {
                model: answered.clone(),
                input_tokens: response.usage.input_tokens,
                output_tokens: response.usage.output_tokens,
                latency_ms,
            }),
            // Its words are built from the room's: the person it answers owns them.
            subject: answers,
        };
        self.room_command(name, speak, meta).await?;
        Ok(Some(Turn {
            agent: seat.name,
            text,
            model: answered,
            input_tokens: response.usage.input_tokens,
            output_tokens: response.usage.output_tokens,
        }))
    }
}

impl Runtime {
    /// What the seat remembers that bears on the room's last messages (from its own memory
    /// scope, and of the person it answers or of no one), as text before its prompt; empty
    /// without a memory or when nothing bears on them. A failing memory is logged, not fatal.
    async fn remembered(&self, room: &Room, seat: &Seat, subject: Option<String>) -> String {
        let Some(recall) = &self.recall else {
            return String::new();
        };
        let recent: Vec<&str> = room
            .lines
            .iter()
            .rev()
            .take(3)
            .filter_map(|l| l.text.get().map(String::as_str))
            .collect();
        let query = if recent.is_empty() {
            room.topic.clone()
        } else {
            recent.join("\n")
        };
        if query.trim().is_empty() {
            return String::new();
        }
        let request = crate::recall::RecallRequest {
            query,
            tokens: ROOM_MEMORY_TOKENS,
            caller: crate::tools::Caller {
                run_id: RunId::from(format!("room/{}", room.name).as_str()),
                task_id: None,
                workflow: "room_turn".into(),
                step: StepId::from("turn"),
                agent: Some(seat.role.clone()),
                subject,
            },
            agent_scope: Some(seat.memory_scope(&room.name)),
        };
        match recall.recall(request).await {
            Ok(text) if !text.trim().is_empty() => format!("What you remember:\n{text}\n\n"),
            Ok(_) => String::new(),
            Err(e) => {
                tracing::warn!(room = %room.name, agent = %seat.name, error = %e,
                    "recalling a room agent's memory failed: it speaks without");
                String::new()
            }
        }
    }

    /// The route a seat speaks through: its own model, else its role's with the model operators
    /// chose for the role first (`None`: the role's route as configured).
    async fn route_of(
        &self,
        router: &ModelRouter,
        seat: &Seat,
    ) -> Result<Option<Vec<ModelRoute>>, RuntimeError> {
        if let Some(model) = &seat.model {
            return seat_route(router, model)
                .map(|route| Some(vec![route]))
                .map_err(RuntimeError::UnknownModel);
        }
        let chosen = self.role_models().await?;
        Ok(match (chosen.get(&seat.role), router.agent(&seat.role)) {
            (Some(model), Some(role)) => crate::agents::chosen_first(&role.route, model),
            _ => None,
        })
    }
}

/// A seat's own model: `provider/model` at a configured provider.
fn seat_route(router: &ModelRouter, model: &str) -> Result<ModelRoute, String> {
    model
        .parse::<ModelRoute>()
        .ok()
        .filter(|route| router.config().providers.contains_key(&route.provider))
        .ok_or_else(|| {
            format!(
                "the model {model:?} is not provider/model at a configured provider ({})",
                router
                    .config()
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The system prompt of a seat: its personality and traits, and where it is.
fn personality(room: &Room, seat: &Seat) -> String {
    let mut text = if seat.personality.trim().is_empty() {
        format!("You are {}.", seat.name)
    } else {
        seat.personality.clone()
    };
    if !seat.traits.is_empty() {
        text.push_str(&format!("\nYour traits: {}.", seat.traits.join(", ")));
    }
    let others: Vec<&str> = room
        .agents
        .iter()
        .filter(|a| a.name != seat.name)
        .map(|a| a.name.as_str())
        .collect();
    text.push_str(&format!(
        "\nYou are {} in the room {} (topic: {}), with {}.",
        seat.name,
        room.name,
        if room.topic.is_empty() {
            "open"
        } else {
            &room.topic
        },
        if others.is_empty() {
            "the people here".to_owned()
        } else {
            others.join(", ")
        }
    ));
    text
}

/// The room's recent messages, oldest first (pinned ones always included).
fn transcript(room: &Room) -> String {
    let recent = room.lines.len().saturating_sub(ROOM_HISTORY);
    let lines: Vec<String> = room
        .lines
        .iter()
        .enumerate()
        .filter(|(i, line)| *i >= recent || line.pinned)
        .map(|(_, line)| {
            let text = line.text.get().map(String::as_str).unwrap_or("[erased]");
            let pin = if line.pinned { " (pinned)" } else { "" };
            format!("{}{pin}: {text}", line.from)
        })
        .collect();
    if lines.is_empty() {
        format!(
            "The room {} has just opened (topic: {}).",
            room.name, room.topic
        )
    } else {
        format!("The room so far:\n{}", lines.join("\n"))
    }
}
