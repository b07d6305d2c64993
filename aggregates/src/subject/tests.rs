use chrono::TimeZone;
use cqrs_es::test::TestFramework;

use super::*;

type Given = TestFramework<Subject>;

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 30, 9, minute, 0).unwrap()
}

fn id(text: &str) -> Identifier {
    Identifier::parse(text).unwrap()
}

fn purpose(name: &str) -> Purpose {
    Purpose::parse(name).unwrap()
}

/// The subject's own value.
fn mine<T>(value: T) -> Personal<T> {
    Personal::of("s-1", value)
}

fn registered(minor: bool) -> SubjectEvent {
    SubjectEvent::SubjectRegistered {
        subject: "s-1".into(),
        identifiers: vec![mine(id("telegram:42"))],
        minor,
    }
}

fn given(by: ConsentBy, minute: u32) -> SubjectEvent {
    SubjectEvent::ConsentGiven {
        purpose: purpose("processing"),
        by,
        channel: Channel::TELEGRAM,
        at: at(minute),
    }
}

fn guardian() -> ConsentBy {
    ConsentBy::Guardian {
        name: mine("parent of 42".into()),
    }
}

#[test]
fn identifiers_have_one_spelling() {
    assert_eq!(
        id(" Email:Ana@Example.ORG ").to_string(),
        "email:ana@example.org"
    );
    assert_eq!(id("TELEGRAM:42").kind(), IdentifierKind::Telegram);
    assert_eq!(id("api:crm-7").value(), "crm-7");
    for bad in [
        "42",
        "telegram:",
        "telegram:4x2",
        "email:ana",
        "email:@example.org",
        "email:a@b@c",
        "email:a b@c",
        "api:nul\0",
        "api:   ",
        "fax:123",
    ] {
        assert!(Identifier::parse(bad).is_err(), "{bad:?}");
    }
    let json = serde_json::to_value(id("email:ana@example.org")).unwrap();
    assert_eq!(json, serde_json::json!("email:ana@example.org"));
    assert!(serde_json::from_value::<Identifier>(serde_json::json!("fax:1")).is_err());
    assert!(Purpose::parse("Memory").is_ok());
    assert!(Purpose::parse("1st").is_err());
}

#[test]
fn a_subject_is_registered_with_its_identifiers_once() {
    Given::with(())
        .given_no_previous_events()
        .when(SubjectCommand::Register {
            subject: "s-1".into(),
            identifiers: vec![id("telegram:42"), id("TELEGRAM:42")],
            minor: false,
        })
        .then_expect_events(vec![registered(false)]);
    Given::with(())
        .given_no_previous_events()
        .when(SubjectCommand::Register {
            subject: "s-1".into(),
            identifiers: vec![],
            minor: false,
        })
        .then_expect_error(SubjectError::NoIdentifier);
    Given::with(())
        .given(vec![registered(false)])
        .when(SubjectCommand::Register {
            subject: "s-1".into(),
            identifiers: vec![id("email:a@b.c")],
            minor: false,
        })
        .then_expect_error(SubjectError::AlreadyRegistered);
    Given::with(())
        .given_no_previous_events()
        .when(SubjectCommand::Link {
            identifier: id("email:a@b.c"),
        })
        .then_expect_error(SubjectError::NotRegistered);
}

#[test]
fn linking_a_known_identifier_changes_nothing() {
    Given::with(())
        .given(vec![registered(false)])
        .when(SubjectCommand::Link {
            identifier: id("telegram:42"),
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered(false)])
        .when(SubjectCommand::Link {
            identifier: id("email:ana@example.org"),
        })
        .then_expect_events(vec![SubjectEvent::IdentifierLinked {
            identifier: mine(id("email:ana@example.org")),
        }]);
}

#[test]
fn consent_is_given_and_withdrawn_per_purpose_with_who_when_and_where() {
    Given::with(())
        .given(vec![registered(false)])
        .when(SubjectCommand::GiveConsent {
            purpose: purpose("processing"),
            by: ConsentBy::Subject,
            channel: Channel::TELEGRAM,
            at: at(1),
        })
        .then_expect_events(vec![given(ConsentBy::Subject, 1)]);
    // Giving it again changes nothing; withdrawing what does not hold is refused.
    Given::with(())
        .given(vec![registered(false), given(ConsentBy::Subject, 1)])
        .when(SubjectCommand::GiveConsent {
            purpose: purpose("processing"),
            by: ConsentBy::Subject,
            channel: Channel::API,
            at: at(2),
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered(false)])
        .when(SubjectCommand::WithdrawConsent {
            purpose: purpose("memory"),
            by: ConsentBy::Subject,
            channel: Channel::TELEGRAM,
            at: at(3),
        })
        .then_expect_error(SubjectError::NoConsent("memory".into()));

    let mut subject = Subject::default();
    for event in [
        registered(false),
        given(ConsentBy::Subject, 1),
        SubjectEvent::ConsentWithdrawn {
            purpose: purpose("processing"),
            by: ConsentBy::Subject,
            channel: Channel::EMAIL,
            at: at(4),
        },
    ] {
        subject.apply(event);
    }
    assert!(!subject.consents_to(&purpose("processing")));
    let withdrawn = &subject.consents[&purpose("processing")];
    assert_eq!((withdrawn.at, &withdrawn.channel), (at(4), &Channel::EMAIL));
}

#[test]
fn a_minors_consent_is_their_guardians() {
    Given::with(())
        .given(vec![registered(true)])
        .when(SubjectCommand::GiveConsent {
            purpose: purpose("processing"),
            by: ConsentBy::Subject,
            channel: Channel::TELEGRAM,
            at: at(1),
        })
        .then_expect_error(SubjectError::NeedsGuardian);
    Given::with(())
        .given(vec![registered(true)])
        .when(SubjectCommand::GiveConsent {
            purpose: purpose("processing"),
            by: guardian(),
            channel: Channel::EMAIL,
            at: at(2),
        })
        .then_expect_events(vec![SubjectEvent::ConsentGiven {
            purpose: purpose("processing"),
            by: guardian(),
            channel: Channel::EMAIL,
            at: at(2),
        }]);

    // A consent given before the subject was known to be a minor no longer counts.
    let mut subject = Subject::default();
    subject.apply(registered(false));
    subject.apply(given(ConsentBy::Subject, 1));
    assert!(subject.consents_to(&purpose("processing")));
    subject.apply(SubjectEvent::MarkedMinor { at: at(5) });
    assert!(!subject.consents_to(&purpose("processing")));
    subject.apply(given(guardian(), 6));
    assert!(subject.consents_to(&purpose("processing")));
}

#[test]
fn a_merged_subject_takes_no_more_commands() {
    Given::with(())
        .given(vec![registered(false)])
        .when(SubjectCommand::Merge {
            into: "s-2".into(),
            at: at(1),
        })
        .then_expect_events(vec![SubjectEvent::SubjectMerged {
            into: "s-2".into(),
            identifiers: vec![mine(id("telegram:42"))],
            at: at(1),
        }]);
    let merged = SubjectEvent::SubjectMerged {
        into: "s-2".into(),
        identifiers: vec![mine(id("telegram:42"))],
        at: at(1),
    };
    Given::with(())
        .given(vec![registered(false), merged])
        .when(SubjectCommand::MarkMinor { at: at(2) })
        .then_expect_error(SubjectError::Merged("s-2".into()));
}

#[test]
fn events_keep_their_stored_shape() {
    let event = given(guardian(), 1);
    let json = serde_json::to_value(&event).unwrap();
    assert_eq!(json["type"], "ConsentGiven");
    assert_eq!(json["data"]["by"], "guardian");
    assert_eq!(json["data"]["name"]["$personal"]["value"], "parent of 42");
    assert_eq!(json["data"]["purpose"], "processing");
    assert_eq!(serde_json::from_value::<SubjectEvent>(json).unwrap(), event);
}

#[test]
fn erasure_destroys_the_keys_of_the_subject_and_of_those_merged_into_it() {
    let absorbed = SubjectEvent::SubjectAbsorbed {
        from: "s-0".into(),
        identifiers: vec![mine(id("email:old@example.org"))],
        at: at(1),
    };
    let erasure = Erasure {
        keys: vec!["s-1".into(), "s-0".into()],
        by: "key:ops".into(),
        reason: "asked to be forgotten".into(),
        at: at(2),
    };
    Given::with(())
        .given(vec![registered(false), absorbed.clone()])
        .when(SubjectCommand::Erase {
            by: "key:ops".into(),
            reason: "asked to be forgotten".into(),
            at: at(2),
        })
        .then_expect_events(vec![SubjectEvent::SubjectErased(erasure.clone())]);
    // Erasing again records nothing; an erased subject takes no other command but an export.
    let history = vec![
        registered(false),
        absorbed,
        SubjectEvent::SubjectErased(erasure),
    ];
    Given::with(())
        .given(history.clone())
        .when(SubjectCommand::Erase {
            by: "retention".into(),
            reason: "retention".into(),
            at: at(3),
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given(history.clone())
        .when(SubjectCommand::Link {
            identifier: id("telegram:7"),
        })
        .then_expect_error(SubjectError::Erased);
    Given::with(())
        .given(history)
        .when(SubjectCommand::RecordExport {
            by: "key:ops".into(),
            events: 3,
            at: at(4),
        })
        .then_expect_events(vec![SubjectEvent::SubjectExported {
            by: "key:ops".into(),
            events: 3,
            at: at(4),
        }]);
}

#[test]
fn erased_identifiers_are_not_part_of_the_state() {
    let mut subject = Subject::default();
    subject.apply(SubjectEvent::SubjectRegistered {
        subject: "s-1".into(),
        identifiers: vec![Personal::Erased {
            subject: "s-1".into(),
        }],
        minor: false,
    });
    assert!(subject.registered);
    assert!(subject.identifiers.is_empty());
    assert_eq!(subject.keys(), vec!["s-1".to_owned()]);
}
