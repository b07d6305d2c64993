//! `Room`: a conversation among several agents and people — each agent a seat with its role,
//! personality and memory scope. Agents take turns by a policy, bounded per hour; moderators (people
//! named at creation) mute, unmute, remove and pin. Every message and action is an event.
//!
//! The aggregate decides who may speak and records what was said; who speaks next under
//! [`TurnPolicy::RoundRobin`] and [`TurnPolicy::Addressed`] is decided here ([`Room::next_speaker`],
//! pure), under [`TurnPolicy::Moderator`] by the runtime asking the moderator agent. People's words
//! are their data (`Personal`, sealed with their key); agents' are the room's.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::personal::Personal;

/// The longest room or seat name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// The longest message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 8_000;
/// Most agents in a room.
pub const MAX_AGENTS: usize = 16;

/// An agent's seat in a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    /// Its name in the room (how people and other agents address it: `@name`).
    pub name: String,
    /// The agent role that answers for it (its models, tools).
    pub role: String,
    /// Its personality: said to the model before the room's conversation.
    #[serde(default)]
    pub personality: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traits: Vec<String>,
    /// The memory scope it remembers in (its own by default: `room:<room>:<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// The model (`provider/model`) that speaks for it instead of its role's route (so one room
    /// can hold agents of different models); its role's choice otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Seat {
    /// The memory scope it remembers in: its own, `room:<room>:<name>`, unless it was given one.
    pub fn memory_scope(&self, room: &str) -> String {
        self.memory
            .clone()
            .unwrap_or_else(|| format!("room:{room}:{}", self.name))
    }
}

/// The model call behind an agent's words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeechCall {
    /// `provider/model` that answered.
    pub model: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// How long the answer took (with retries and fallbacks).
    pub latency_ms: u64,
}

/// Who speaks next.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TurnPolicy {
    /// Each agent in turn, in seat order.
    #[default]
    RoundRobin,
    /// The agent the last message addresses (`@name`); otherwise round robin.
    Addressed,
    /// A moderator agent (one of the seats) picks the next speaker among the others.
    Moderator { agent: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomCommand {
    Create {
        name: String,
        topic: String,
        agents: Vec<Seat>,
        /// People who may moderate (subject ids or operators' names).
        moderators: Vec<String>,
        policy: TurnPolicy,
        /// Agent turns allowed in any hour.
        turns_per_hour: u32,
    },
    /// A person says something.
    Post {
        from: String,
        /// The person's subject, whose data the words are.
        subject: Option<String>,
        text: String,
        at: DateTime<Utc>,
    },
    /// An agent's turn `turn` (the room's count of turns so far, for idempotency): what it said.
    Speak {
        agent: String,
        turn: u64,
        text: String,
        at: DateTime<Utc>,
        call: Option<SpeechCall>,
        /// The person it answers (the last who spoke before it with a subject): its words, built
        /// from theirs, are sealed with their key.
        subject: Option<String>,
    },
    Mute {
        member: String,
        by: String,
    },
    Unmute {
        member: String,
        by: String,
    },
    Remove {
        member: String,
        by: String,
    },
    Pin {
        seq: u64,
        by: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum RoomEvent {
    RoomCreated {
        name: String,
        topic: String,
        agents: Vec<Seat>,
        moderators: Vec<String>,
        policy: TurnPolicy,
        turns_per_hour: u32,
    },
    MessagePosted {
        seq: u64,
        from: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        text: Personal<String>,
        at: DateTime<Utc>,
    },
    AgentSpoke {
        seq: u64,
        agent: String,
        turn: u64,
        /// Sealed with the key of the person it answers, when there is one.
        text: Personal<String>,
        at: DateTime<Utc>,
        /// The model call it came from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<SpeechCall>,
        /// The memory scope its words are remembered in (its seat's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory: Option<String>,
    },
    MemberMuted {
        member: String,
        by: String,
    },
    MemberUnmuted {
        member: String,
        by: String,
    },
    MemberRemoved {
        member: String,
        by: String,
    },
    MessagePinned {
        seq: u64,
        by: String,
    },
}

impl DomainEvent for RoomEvent {
    fn event_type(&self) -> String {
        match self {
            RoomEvent::RoomCreated { .. } => "RoomCreated",
            RoomEvent::MessagePosted { .. } => "MessagePosted",
            RoomEvent::AgentSpoke { .. } => "AgentSpoke",
            RoomEvent::MemberMuted { .. } => "MemberMuted",
            RoomEvent::MemberUnmuted { .. } => "MemberUnmuted",
            RoomEvent::MemberRemoved { .. } => "MemberRemoved",
            RoomEvent::MessagePinned { .. } => "MessagePinned",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoomError {
    #[error("a room with this name exists already")]
    AlreadyCreated,
    #[error("there is no such room")]
    NotCreated,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not a moderator of this room")]
    NotModerator(String),
    #[error("{0} is not in this room")]
    NotMember(String),
    #[error("{0} is muted")]
    Muted(String),
    #[error("{agent} may not speak now: it is {expected}'s turn")]
    NotItsTurn { agent: String, expected: String },
    #[error("the room's agents used their {0} turns of the last hour")]
    TurnBudget(u32),
    #[error("no message {0} in this room")]
    NoMessage(u64),
}

/// One message of the room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub seq: u64,
    pub from: String,
    /// Whether an agent said it.
    pub agent: bool,
    pub text: Personal<String>,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub pinned: bool,
}

/// A room's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Room {
    pub created: bool,
    pub name: String,
    pub topic: String,
    pub agents: Vec<Seat>,
    pub moderators: Vec<String>,
    pub policy: TurnPolicy,
    pub turns_per_hour: u32,
    pub muted: Vec<String>,
    pub removed: Vec<String>,
    pub lines: Vec<Line>,
    /// Agent turns taken so far.
    pub turns: u64,
    /// When the agents' recent turns were taken (the last hour's, at most).
    pub recent_turns: Vec<DateTime<Utc>>,
}

fn check_name(what: &str, name: &str) -> Result<(), RoomError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(RoomError::Invalid(format!(
            "{what} {name:?}: 1 to {MAX_NAME_BYTES} letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_text(text: &str) -> Result<(), RoomError> {
    let chars = text.chars().count();
    if text.trim().is_empty() || chars > MAX_MESSAGE_CHARS || text.contains('\0') {
        return Err(RoomError::Invalid(format!(
            "a message has 1 to {MAX_MESSAGE_CHARS} characters, not all white space, no NUL"
        )));
    }
    Ok(())
}

impl Room {
    /// The agents that may speak: seated, not muted, not removed.
    pub fn speakers(&self) -> Vec<&Seat> {
        self.agents
            .iter()
            .filter(|a| !self.muted.contains(&a.name) && !self.removed.contains(&a.name))
            .collect()
    }

    fn is_agent(&self, name: &str) -> bool {
        self.agents.iter().any(|a| a.name == name)
    }

    /// Who speaks next under round robin or addressing; `None` when no agent may speak, or
    /// when the moderator agent decides (the runtime asks it, among [`Room::speakers`] but
    /// itself).
    pub fn next_speaker(&self) -> Option<String> {
        let speakers = self.speakers();
        if speakers.is_empty() {
            return None;
        }
        if let TurnPolicy::Moderator { .. } = self.policy {
            return None;
        }
        if self.policy == TurnPolicy::Addressed {
            if let Some(last) = self.lines.last() {
                let text = last.text.get().map(String::as_str).unwrap_or("");
                if let Some(seat) = speakers
                    .iter()
                    .find(|s| s.name != last.from && text.contains(&format!("@{}", s.name)))
                {
                    return Some(seat.name.clone());
                }
            }
        }
        // Round robin: the first speaker after the last agent that spoke, in seat order.
        let last_agent = self.lines.iter().rev().find(|l| l.agent).map(|l| &l.from);
        let after = last_agent
            .and_then(|name| self.agents.iter().position(|a| &a.name == name))
            .map_or(0, |at| at + 1);
        let order = self
            .agents
            .iter()
            .cycle()
            .skip(after)
            .take(self.agents.len());
        order
            .filter(|seat| speakers.iter().any(|s| s.name == seat.name))
            .map(|seat| seat.name.clone())
            .next()
    }

    /// Turns left in the hour before `now`.
    pub fn turns_left(&self, now: DateTime<Utc>) -> u32 {
        let hour_ago = now - Duration::hours(1);
        let used = self.recent_turns.iter().filter(|t| **t > hour_ago).count() as u32;
        self.turns_per_hour.saturating_sub(used)
    }

    fn moderator(&self, by: &str) -> Result<(), RoomError> {
        if self.moderators.iter().any(|m| m == by) {
            Ok(())
        } else {
            Err(RoomError::NotModerator(by.to_owned()))
        }
    }

    fn member(&self, member: &str) -> Result<(), RoomError> {
        if self.is_agent(member) || self.lines.iter().any(|l| l.from == member) {
            Ok(())
        } else {
            Err(RoomError::NotMember(member.to_owned()))
        }
    }
}

impl Aggregate for Room {
    const TYPE: &'static str = "room";
    type Command = RoomCommand;
    type Event = RoomEvent;
    type Error = RoomError;
    type Services = ();

    async fn handle(
        &mut self,
        command: RoomCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), RoomError> {
        if let RoomCommand::Create { .. } = command {
            if self.created {
                return Err(RoomError::AlreadyCreated);
            }
        } else if !self.created {
            return Err(RoomError::NotCreated);
        }
        let next_seq = self.lines.last().map_or(1, |l| l.seq + 1);
        let event = match command {
            RoomCommand::Create {
                name,
                topic,
                agents,
                moderators,
                policy,
                turns_per_hour,
            } => {
                check_name("room", &name)?;
                if agents.is_empty() || agents.len() > MAX_AGENTS {
                    return Err(RoomError::Invalid(format!(
                        "a room has 1 to {MAX_AGENTS} agents"
                    )));
                }
                for (i, seat) in agents.iter().enumerate() {
                    check_name("agent", &seat.name)?;
                    check_name("role", &seat.role)?;
                    if let Some(model) = &seat.model {
                        let ok = model.len() <= 200
                            && model
                                .split_once('/')
                                .is_some_and(|(p, m)| !p.is_empty() && !m.trim().is_empty());
                        if !ok {
                            return Err(RoomError::Invalid(format!(
                                "agent {}'s model {model:?}: give provider/model",
                                seat.name
                            )));
                        }
                    }
                    if agents[..i].iter().any(|a| a.name == seat.name) {
                        return Err(RoomError::Invalid(format!(
                            "two agents are named {}",
                            seat.name
                        )));
                    }
                }
                if let TurnPolicy::Moderator { agent } = &policy {
                    if !agents.iter().any(|a| &a.name == agent) || agents.len() < 2 {
                        return Err(RoomError::Invalid(format!(
                            "the moderator agent {agent:?} must be one of the room's agents, with others to give the floor to"
                        )));
                    }
                }
                if turns_per_hour == 0 || turns_per_hour > 3_600 {
                    return Err(RoomError::Invalid("turns per hour: 1 to 3,600".to_owned()));
                }
                RoomEvent::RoomCreated {
                    name,
                    topic,
                    agents,
                    moderators,
                    policy,
                    turns_per_hour,
                }
            }
            RoomCommand::Post {
                from,
                subject,
                text,
                at,
            } => {
                check_text(&text)?;
                if self.removed.contains(&from) {
                    return Err(RoomError::NotMember(from));
                }
                if self.muted.contains(&from) {
                    return Err(RoomError::Muted(from));
                }
                if self.is_agent(&from) {
                    return Err(RoomError::Invalid(format!(
                        "{from} is one of the room's agents: agents speak in their turns"
                    )));
                }
                RoomEvent::MessagePosted {
                    seq: next_seq,
                    text: Personal::owned_by(subject.as_deref(), text),
                    from,
                    subject,
                    at,
                }
            }
            RoomCommand::Speak {
                agent,
                turn,
                text,
                at,
                call,
                subject,
            } => {
                if turn < self.turns {
                    // A repeated turn (a retried job): it was recorded.
                    return Ok(());
                }
                check_text(&text)?;
                if !self.is_agent(&agent) || self.removed.contains(&agent) {
                    return Err(RoomError::NotMember(agent));
                }
                if self.muted.contains(&agent) {
                    return Err(RoomError::Muted(agent));
                }
                if self.turns_left(at) == 0 {
                    return Err(RoomError::TurnBudget(self.turns_per_hour));
                }
                if let Some(expected) = self.next_speaker() {
                    if expected != agent {
                        return Err(RoomError::NotItsTurn { agent, expected });
                    }
                }
                let memory = self
                    .agents
                    .iter()
                    .find(|s| s.name == agent)
                    .map(|seat| seat.memory_scope(&self.name));
                RoomEvent::AgentSpoke {
                    seq: next_seq,
                    agent,
                    turn: self.turns,
                    text: Personal::owned_by(subject.as_deref(), text),
                    at,
                    call,
                    memory,
                }
            }
            RoomCommand::Mute { member, by } => {
                self.moderator(&by)?;
                self.member(&member)?;
                if self.muted.contains(&member) {
                    return Ok(());
                }
                RoomEvent::MemberMuted { member, by }
            }
            RoomCommand::Unmute { member, by } => {
                self.moderator(&by)?;
                if !self.muted.contains(&member) {
                    return Ok(());
                }
                RoomEvent::MemberUnmuted { member, by }
            }
            RoomCommand::Remove { member, by } => {
                self.moderator(&by)?;
                self.member(&member)?;
                if self.removed.contains(&member) {
                    return Ok(());
                }
                RoomEvent::MemberRemoved { member, by }
            }
            RoomCommand::Pin { seq, by } => {
                self.moderator(&by)?;
                match self.lines.iter().find(|l| l.seq == seq) {
                    None => return Err(RoomError::NoMessage(seq)),
                    Some(line) if line.pinned => return Ok(()),
                    Some(_) => RoomEvent::MessagePinned { seq, by },
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: RoomEvent) {
        match event {
            RoomEvent::RoomCreated {
                name,
                topic,
                agents,
                moderators,
                policy,
                turns_per_hour,
            } => {
                self.created = true;
                self.name = name;
                self.topic = topic;
                self.agents = agents;
                self.moderators = moderators;
                self.policy = policy;
                self.turns_per_hour = turns_per_hour;
            }
            RoomEvent::MessagePosted {
                seq,
                from,
                text,
                at,
                ..
            } => self.lines.push(Line {
                seq,
                from,
                agent: false,
                text,
                at,
                pinned: false,
            }),
            RoomEvent::AgentSpoke {
                seq,
                agent,
                turn,
                text,
                at,
                ..
            } => {
                self.lines.push(Line {
                    seq,
                    from: agent,
                    agent: true,
                    text,
                    at,
                    pinned: false,
                });
                self.turns = turn + 1;
                let hour_ago = at - Duration::hours(1);
                self.recent_turns.retain(|t| *t > hour_ago);
                self.recent_turns.push(at);
            }
            RoomEvent::MemberMuted { member, .. } => self.muted.push(member),
            RoomEvent::MemberUnmuted { member, .. } => self.muted.retain(|m| *m != member),
            RoomEvent::MemberRemoved { member, .. } => {
                self.muted.retain(|m| *m != member);
                self.removed.push(member);
            }
            RoomEvent::MessagePinned { seq, .. } => {
                if let Some(line) = self.lines.iter_mut().find(|l| l.seq == seq) {
                    line.pinned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<Room>;

    fn seat(name: &str) -> Seat {
        Seat {
            name: name.into(),
            role: "vox".into(),
            personality: format!("You are {name}."),
            traits: vec![],
            memory: None,
            model: None,
        }
    }

    fn created(policy: TurnPolicy, turns_per_hour: u32) -> RoomEvent {
        RoomEvent::RoomCreated {
            name: "lab".into(),
            topic: "ideas".into(),
            agents: vec![seat("ada"), seat("bob"), seat("cyd")],
            moderators: vec!["mia".into()],
            policy,
            turns_per_hour,
        }
    }

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + minute * 60, 0).unwrap()
    }

    fn spoke(agent: &str, turn: u64, seq: u64, minute: i64) -> RoomEvent {
        RoomEvent::AgentSpoke {
            seq,
            agent: agent.into(),
            turn,
            text: Personal::plain(format!("{agent} says hi")),
            at: at(minute),
            call: None,
            memory: Some(format!("room:lab:{agent}")),
        }
    }

    fn speak(agent: &str, turn: u64, minute: i64) -> RoomCommand {
        RoomCommand::Speak {
            agent: agent.into(),
            turn,
            text: format!("{agent} says hi"),
            at: at(minute),
            call: None,
            subject: None,
        }
    }

    fn room(events: Vec<RoomEvent>) -> Room {
        let mut room = Room::default();
        for event in events {
            room.apply(event);
        }
        room
    }

    #[test]
    fn agents_take_turns_round_robin_skipping_the_muted() {
        let mut state = room(vec![created(TurnPolicy::RoundRobin, 10)]);
        assert_eq!(state.next_speaker().as_deref(), Some("ada"));
        state.apply(spoke("ada", 0, 1, 0));
        assert_eq!(state.next_speaker().as_deref(), Some("bob"));
        state.apply(RoomEvent::MemberMuted {
            member: "bob".into(),
            by: "mia".into(),
        });
        assert_eq!(state.next_speaker().as_deref(), Some("cyd"));
        state.apply(spoke("cyd", 1, 2, 1));
        assert_eq!(state.next_speaker().as_deref(), Some("ada"));
        Given::with(())
            .given(vec![
                created(TurnPolicy::RoundRobin, 10),
                spoke("ada", 0, 1, 0),
            ])
            .when(speak("cyd", 1, 1))
            .then_expect_error(RoomError::NotItsTurn {
                agent: "cyd".into(),
                expected: "bob".into(),
            });
        Given::with(())
            .given(vec![
                created(TurnPolicy::RoundRobin, 10),
                spoke("ada", 0, 1, 0),
            ])
            .when(speak("ada", 0, 1))
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_addressed_agent_speaks_next() {
        let mut state = room(vec![created(TurnPolicy::Addressed, 10)]);
        state.apply(RoomEvent::MessagePosted {
            seq: 1,
            from: "mia".into(),
            subject: None,
            text: Personal::plain("@cyd what do you think?".into()),
            at: at(0),
        });
        assert_eq!(state.next_speaker().as_deref(), Some("cyd"));
    }

    #[test]
    fn turns_are_bounded_per_hour() {
        Given::with(())
            .given(vec![
                created(TurnPolicy::RoundRobin, 2),
                spoke("ada", 0, 1, 0),
                spoke("bob", 1, 2, 10),
            ])
            .when(speak("cyd", 2, 30))
            .then_expect_error(RoomError::TurnBudget(2));
        Given::with(())
            .given(vec![
                created(TurnPolicy::RoundRobin, 2),
                spoke("ada", 0, 1, 0),
                spoke("bob", 1, 2, 10),
            ])
            .when(speak("cyd", 2, 61))
            .then_expect_events(vec![spoke("cyd", 2, 3, 61)]);
    }

    #[test]
    fn only_moderators_mute_remove_and_pin() {
        Given::with(())
            .given(vec![created(TurnPolicy::RoundRobin, 10)])
            .when(RoomCommand::Mute {
                member: "bob".into(),
                by: "eve".into(),
            })
            .then_expect_error(RoomError::NotModerator("eve".into()));
        Given::with(())
            .given(vec![created(TurnPolicy::RoundRobin, 10)])
            .when(RoomCommand::Mute {
                member: "bob".into(),
                by: "mia".into(),
            })
            .then_expect_events(vec![RoomEvent::MemberMuted {
                member: "bob".into(),
                by: "mia".into(),
            }]);
        Given::with(())
            .given(vec![
                created(TurnPolicy::RoundRobin, 10),
                spoke("ada", 0, 1, 0),
            ])
            .when(RoomCommand::Pin {
                seq: 1,
                by: "mia".into(),
            })
            .then_expect_events(vec![RoomEvent::MessagePinned {
                seq: 1,
                by: "mia".into(),
            }]);
        Given::with(())
            .given(vec![
                created(TurnPolicy::RoundRobin, 10),
                RoomEvent::MemberMuted {
                    member: "ada".into(),
                    by: "mia".into(),
                },
            ])
            .when(speak("ada", 0, 0))
            .then_expect_error(RoomError::Muted("ada".into()));
    }

    #[test]
    fn bad_rooms_are_refused() {
        let create = |agents: Vec<Seat>, policy| RoomCommand::Create {
            name: "lab".into(),
            topic: String::new(),
            agents,
            moderators: vec![],
            policy,
            turns_per_hour: 10,
        };
        let moderated = |agent: &str| TurnPolicy::Moderator {
            agent: agent.into(),
        };
        for (command, why) in [
            (create(vec![], TurnPolicy::RoundRobin), "1 to 16 agents"),
            (
                create(vec![seat("ada"), seat("ada")], TurnPolicy::RoundRobin),
                "two agents are named ada",
            ),
            (
                create(vec![seat("bad name")], TurnPolicy::RoundRobin),
                "agent \"bad name\"",
            ),
            (
                create(vec![seat("ada")], moderated("ada")),
                "moderator agent",
            ),
            (
                create(vec![seat("ada"), seat("bob")], moderated("zed")),
                "moderator agent \"zed\"",
            ),
        ] {
            let result = Given::with(())
                .given_no_previous_events()
                .when(command)
                .inspect_result();
            match result {
                Err(RoomError::Invalid(message)) => assert!(message.contains(why), "{message}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }
}
