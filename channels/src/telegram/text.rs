//! What people type: bot commands, parsed; and what the bot says back in words.

/// The commands the bot offers (registered with `setMyCommands`), with what each does.
pub(super) const COMMANDS: &[(&str, &str)] = &[
    ("start", "Say hello and see what I can do"),
    ("help", "The commands"),
    ("status", "Your tasks in progress, and how I am"),
    ("reset", "Start a new conversation"),
    (
        "models",
        "The assistants and models you can use; /models ROLE MODEL to switch",
    ),
    ("new_task", "Start a task: /new_task what to do"),
    ("cancel", "Cancel your latest task in progress"),
    ("whoami", "Your ids, as I know you"),
    ("export", "Receive all the data I hold about you"),
    ("forget", "Erase all the data I hold about you"),
];

/// A message that is a command: `/name[@bot] arguments`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Start,
    Help,
    Status,
    Reset,
    /// With its arguments: none to list, `ROLE MODEL` to switch, `ROLE default` to switch back.
    Models(String),
    NewTask(String),
    Cancel,
    WhoAmI,
    Export,
    Forget {
        confirmed: bool,
    },
    /// A command the bot does not know (its name, without the slash).
    Unknown(String),
}

/// The command `text` is, if it is one (`None` for plain text). A command addressed to another
/// bot (`/help@other_bot`) is plain text to this one.
pub fn command_of(text: &str, bot_username: Option<&str>) -> Option<Command> {
    let text = text.trim_start();
    let rest = text.strip_prefix('/')?;
    let (word, arguments) = match rest.split_once(char::is_whitespace) {
        Some((word, arguments)) => (word, arguments.trim()),
        None => (rest, ""),
    };
    let name = match word.split_once('@') {
        Some((name, addressee)) => {
            if bot_username.is_some_and(|me| !me.eq_ignore_ascii_case(addressee)) {
                return None;
            }
            name
        }
        None => word,
    };
    if name.is_empty() {
        return None;
    }
    Some(match name.to_ascii_lowercase().as_str() {
        "start" => Command::Start,
        "help" => Command::Help,
        "status" => Command::Status,
        "reset" => Command::Reset,
        "models" => Command::Models(arguments.to_owned()),
        "new_task" | "newtask" => Command::NewTask(arguments.to_owned()),
        "cancel" => Command::Cancel,
        "whoami" => Command::WhoAmI,
        "export" => Command::Export,
        "forget" => Command::Forget {
            confirmed: arguments.eq_ignore_ascii_case("yes"),
        },
        _ => Command::Unknown(name.to_owned()),
    })
}

/// The answer to `/help`.
pub(super) fn help() -> String {
    let mut text = String::from("What I understand:\n");
    for (name, about) in COMMANDS {
        text.push_str(&format!("/{name} — {about}\n"));
    }
    text.push_str("\nAnything else you write, I answer.");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_parsed_with_their_arguments_and_addressee() {
        assert_eq!(command_of("hello", None), None);
        assert_eq!(command_of("/start", None), Some(Command::Start));
        assert_eq!(command_of("  /HELP", None), Some(Command::Help));
        assert_eq!(
            command_of("/new_task  write a parser \n in Rust", Some("stele_bot")),
            Some(Command::NewTask("write a parser \n in Rust".into()))
        );
        assert_eq!(
            command_of("/status@Stele_Bot", Some("stele_bot")),
            Some(Command::Status)
        );
        assert_eq!(command_of("/status@other_bot", Some("stele_bot")), None);
        assert_eq!(
            command_of("/forget yes", None),
            Some(Command::Forget { confirmed: true })
        );
        assert_eq!(
            command_of("/forget", None),
            Some(Command::Forget { confirmed: false })
        );
        assert_eq!(
            command_of("/dance now", None),
            Some(Command::Unknown("dance".into()))
        );
        assert_eq!(command_of("/", None), None);
    }
}
