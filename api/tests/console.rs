//! The console in a real browser: headless Chromium driven over WebDriver (ChromeDriver), against
//! a real server. It signs in (by keyboard, after a refused key), creates a task, opens its
//! timeline and a model call, retries a dead job, verifies an event's inclusion proof in the
//! browser, exports and erases a person, shows a conversation's delivered reply and the task it
//! belongs to, shows only what a key's scopes allow, fits 1280 px and a phone's width — with no
//! error in the browser's console. A run that sleeps, calls tools, waits for a signal and fans
//! out is followed live until the signal sent over the API lets it finish. A screenshot of each
//! main page is kept under the build's temporary folder (`console-screenshots/`). The session's
//! cookie and CSRF rules are checked over plain HTTP.

mod support;

use std::time::Duration;

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{json, Value};
use stele_aggregates::api_key::Scope;
use stele_engine::queue::NewJob;
use stele_models::config::{ProviderConfig, ScriptRule, ScriptedToolCall};
use stele_models::ModelsConfig;
use stele_workflows::catalog::Source;
use support::{Options, Server};

/// A run with a step of each kind the timeline draws: a timer, a tool step (its input is the
/// command), an agent calling a tool, a wait for a signal, and child runs (one per part the
/// signal names).
const TIMELINE: &str = r#"
name: timeline
version: 1
steps:
  - id: pause
    kind: sleep
    duration: 20ms
  - id: shell
    kind: tool
    tool: echo
    input: { command: "ls -l {{ input }}" }
  - id: look
    kind: agent
    agent: vox
    prompt: "look it up with echo: {{ input }}"
  - id: approve
    kind: wait
    signal: go
  - id: parts
    kind: fan_out
    items: steps.approve.output.parts
    workflow: timeline_part
  - id: send
    kind: reply
    text: "done"
"#;

/// One child run of [`TIMELINE`].
const TIMELINE_PART: &str = r#"
name: timeline_part
version: 1
steps:
  - id: part
    kind: tool
    tool: echo
    input: { part: "{{ input }}" }
"#;

/// The trace a request continues (as a caller's `traceparent` names it).
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn runtime() -> tokio::runtime::Runtime {
    stele_engine::testing::runtime()
}

/// A ChromeDriver on a free port, stopped when dropped.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn driver() -> Driver {
    let binary = std::env::var("STELE_CHROMEDRIVER")
        .expect("STELE_CHROMEDRIVER (scripts/services.sh installs chromium-driver)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(binary)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = reqwest::get(format!("{url}/status")).await {
            if response.status().is_success() {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ChromeDriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, url }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = std::env::var("STELE_CHROMIUM")
        .expect("STELE_CHROMIUM (scripts/services.sh installs chromium)");
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--lang=en-GB"]
        },
        "goog:loggingPrefs": { "browser": "ALL" }
    });
    let capabilities = match capabilities {
        Value::Object(map) => map,
        _ => unreachable!(),
    };
    // WebDriver over plain HTTP on loopback: no TLS connector needed.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap()
}

/// The browser's console log so far (ChromeDriver's log endpoint).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

async fn errors_in_console(client: &Client) -> Vec<String> {
    let log = client.issue_cmd(BrowserLog).await.unwrap();
    log.as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["level"] == "SEVERE")
        .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn shot(client: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn wait_for(client: &Client, css: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// Waits until the text of `css` contains `text`.
async fn wait_for_text(client: &Client, css: &str, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            if let Ok(seen) = element.text().await {
                if seen.contains(text) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{css} says {seen:?}, not {text:?}"
                );
            }
        }
        assert!(std::time::Instant::now() < deadline, "no {css}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a page of the console (`path` after `#/`).
async fn visit(client: &Client, base: &str, path: &str) {
    client
        .goto(&format!("{base}/console/#/{path}"))
        .await
        .unwrap();
}

/// Clicks the element `css` names.
async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Presses `key` on the keyboard: it goes to whatever has the focus.
async fn press(client: &Client, key: Key) {
    let key = char::from(key);
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: key })
        .then(KeyAction::Up { value: key });
    client.perform_actions(keys).await.unwrap();
}

/// What has the focus: its id, else its text.
/// The text of the element `css` finds.
async fn text_of(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn focused(client: &Client) -> String {
    let name = client
        .execute(
            "const e = document.activeElement;
             return e.id || e.textContent.trim();",
            vec![],
        )
        .await
        .unwrap();
    name.as_str().unwrap_or_default().to_owned()
}

/// Whether the page is no wider than the window (nothing to scroll sideways).
async fn fits(client: &Client) -> bool {
    let fits = client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1",
            vec![],
        )
        .await
        .unwrap();
    fits == Value::Bool(true)
}

async fn sign_in(client: &Client, base: &str, key: &str) {
    client.goto(&format!("{base}/")).await.unwrap();
    let input = wait_for(client, "#signin #key").await;
    input.send_keys(key).await.unwrap();
    click(client, "#signin button[type=submit]").await;
    wait_for(client, "#tasks").await;
}

#[test]
fn the_console_works_in_a_real_browser() {
    runtime().block_on(async {
        let s = Server::start(Options::default()).await;
        let base = s.base.clone();
        // A dead job to retry, a person to export and erase, a room to look at.
        let dead = s
            .store
            .queue
            .enqueue(vec![NewJob::new(
                stele_workflows::runtime::QUEUE,
                "console.nothing",
                json!({}),
            )
            .max_attempts(1)])
            .await
            .unwrap()[0]
            .job()
            .id
            .to_string();
        let (status, ana) = s
            .call(
                reqwest::Method::POST,
                "/v1/subjects",
                &[],
                Some(&s.admin),
                Some(json!({ "identifiers": ["api:ana"] })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{ana}");
        let ana = ana["id"].as_str().unwrap().to_owned();
        let room = json!({ "name": "lab", "topic": "names",
                           "agents": [{ "name": "ada", "role": "vox" }], "moderators": ["mia"] });
        let (status, _) = s
            .call(
                reqwest::Method::POST,
                "/v1/rooms",
                &[],
                Some(&s.writer),
                Some(room),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);

        // A fact in an agent's memory, searchable once the memory has indexed it.
        let (status, fact) = s
            .call(
                reqwest::Method::POST,
                "/v1/memories",
                &[],
                Some(&s.admin),
                Some(
                    json!({ "content": "The standup is at 9:30 in the Orion room",
                             "scope": { "agent": "vox" } }),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{fact}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, found) = s
                .call(
                    reqwest::Method::GET,
                    "/v1/memories/search?q=standup&agent=vox",
                    &[],
                    Some(&s.admin),
                    None,
                )
                .await;
            if !found["hits"].as_array().unwrap().is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never indexed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A chat as the Telegram channel leaves it: a message in, and a delivered reply that
        // belongs to a task.
        let answered = s.create("assistant", "from the chat").await;
        {
            use stele_aggregates::conversation::{
                Channel, Conversation, ConversationCommand, Participant,
            };
            let bus: stele_engine::CommandBus<Conversation> =
                stele_engine::CommandBus::new(s.store.log.clone(), ());
            let meta = || stele_engine::CommandMeta::new("test", "test");
            let open = ConversationCommand::Open {
                channel: Channel::TELEGRAM,
                external_id: "1".into(),
                subject: None,
                address: None,
                owner: None,
                participants: vec![],
            };
            bus.create("chat-1", open, meta()).await.unwrap();
            let receive = ConversationCommand::ReceiveMessage {
                message_id: "m-1".into(),
                external_id: "10".into(),
                from: Participant::person("telegram:7"),
                text: "hello from the chat".into(),
                attachments: vec![],
                in_reply_to: None,
                sent_at: None,
                no_reply: Some("a test message: no answer".into()),
            };
            bus.execute("chat-1", receive, meta()).await.unwrap();
            let join = ConversationCommand::Join {
                participant: Participant::agent("vox"),
            };
            bus.execute("chat-1", join, meta()).await.unwrap();
            let reply = ConversationCommand::QueueReply {
                message_id: "r-1".into(),
                from: "vox".into(),
                text: "hello from the agent".into(),
                attachments: vec![],
                in_reply_to: Some("m-1".into()),
                task_id: Some(answered.clone()),
            };
            bus.execute("chat-1", reply, meta()).await.unwrap();
            let delivered = ConversationCommand::MarkDelivered {
                message_id: "r-1".into(),
                external_id: "11".into(),
            };
            bus.execute("chat-1", delivered, meta()).await.unwrap();
        }

        let driver = driver().await;
        let client = browser(&driver).await;

        // Signing in, with the key field focused for the keyboard.
        client.goto(&format!("{base}/")).await.unwrap();
        wait_for(&client, "#signin #key").await;
        assert_eq!(focused(&client).await, "key");
        shot(&client, "sign-in").await;
        // A key that is not valid is refused in a sentence (the refusal is the one error the
        // browser logs).
        wait_for(&client, "#signin #key")
            .await
            .send_keys("stele_nope")
            .await
            .unwrap();
        click(&client, "#signin button[type=submit]").await;
        wait_for_text(&client, "#notice", "not valid").await;
        let notice = text_of(&client, "#notice").await;
        assert_eq!(notice, "This API key is not valid.");
        let errors = errors_in_console(&client).await;
        assert!(
            errors.len() == 1 && errors[0].contains("401"),
            "{errors:#?}"
        );
        // Signed in by keyboard alone: the key, Tab to the button, Enter.
        let key = client.find(Locator::Css("#signin #key")).await.unwrap();
        key.clear().await.unwrap();
        key.send_keys(&s.admin).await.unwrap();
        press(&client, Key::Tab).await;
        assert_eq!(focused(&client).await, "Sign in");
        press(&client, Key::Enter).await;
        wait_for(&client, "#tasks").await;

        // A task created in the page, followed live to its end.
        wait_for(&client, "#new-input")
            .await
            .send_keys("hello console")
            .await
            .unwrap();
        click(&client, "#new-workflow option[value='assistant']").await;
        click(&client, "#new-task button[type=submit]").await;
        wait_for(&client, "#live[data-finished='true']").await;
        wait_for_text(&client, "#task-summary", "completed").await;
        shot(&client, "task").await;
        // Its timeline: a step, opened, shows its model call.
        wait_for(&client, "#waterfall details.step summary")
            .await
            .click()
            .await
            .unwrap();
        wait_for_text(
            &client,
            "#waterfall details.step[open] .model-call",
            "scripted/",
        )
        .await;
        assert!(!client
            .find_all(Locator::Css("#events details.event"))
            .await
            .unwrap()
            .is_empty());
        shot(&client, "timeline").await;

        // The task list shows it.
        visit(&client, &base, "tasks").await;
        wait_for_text(&client, "#tasks", "hello console").await;
        shot(&client, "tasks").await;
        // By keyboard from the page's start: Tab goes through the skip link, the sections and
        // signing out to the page's own form; the skip link takes the focus to the content.
        client.refresh().await.unwrap();
        wait_for_text(&client, "#tasks", "hello console").await;
        let mut order = Vec::new();
        for _ in 0..11 {
            press(&client, Key::Tab).await;
            order.push(focused(&client).await);
        }
        assert_eq!(
            order,
            [
                "Skip to content",
                "Stele",
                "Tasks",
                "Conversations",
                "Rooms",
                "Operations",
                "Audit",
                "People",
                "Memory",
                "Sign out",
                "new-input",
            ],
        );
        client.refresh().await.unwrap();
        wait_for_text(&client, "#tasks", "hello console").await;
        press(&client, Key::Tab).await;
        press(&client, Key::Enter).await;
        assert_eq!(focused(&client).await, "main");
        let hash = client
            .execute("return location.hash", vec![])
            .await
            .unwrap();
        assert_eq!(hash, "#/tasks");
        // 1280 px wide: the widest list fits without scrolling sideways.
        assert!(fits(&client).await, "the task list is wider than 1280 px");
        // Opened quickly one after the other, the list and then the task: the list's answers
        // come late and must not draw the list over the task.
        let id = wait_for(&client, "#tasks tr[data-task]")
            .await
            .attr("data-task")
            .await
            .unwrap()
            .unwrap();
        const WORKFLOW_ANSWERS: &str = "performance.getEntriesByType('resource')
             .filter((e) => e.name.endsWith('/v1/workflows')).length";
        let before = client
            .execute(&format!("return {WORKFLOW_ANSWERS};"), vec![])
            .await
            .unwrap();
        client
            .execute(
                "const id = arguments[0];
                 addEventListener('hashchange', () => { location.hash = `#/tasks/${id}`; }, { once: true });
                 location.hash = '#/tasks?status=completed';",
                vec![json!(id)],
            )
            .await
            .unwrap();
        // Once the list's answer (the workflows) has arrived, the task's page is still there.
        client
            .execute_async(
                &format!(
                    "const [before, done] = arguments;
                     const arrived = () => {WORKFLOW_ANSWERS} > before;
                     if (arrived()) return done();
                     new PerformanceObserver((_, observer) => {{
                       if (arrived()) {{ observer.disconnect(); done(); }}
                     }}).observe({{ type: 'resource' }});"
                ),
                vec![before],
            )
            .await
            .unwrap();
        wait_for(&client, "#live[data-finished='true']").await;
        assert!(client.find(Locator::Css("#live")).await.is_ok());
        assert!(client.find(Locator::Css("#tasks")).await.is_err());
        visit(&client, &base, "tasks").await;
        wait_for_text(&client, "#tasks", "hello console").await;
        // Searched for by its words (any case); no match, and a window with no task, said so.
        wait_for(&client, "#f-q")
            .await
            .send_keys("HELLO")
            .await
            .unwrap();
        click(&client, "#filters button[type=submit]").await;
        wait_for_text(&client, "#searched", "searched").await;
        wait_for_text(&client, "#tasks", "hello console").await;
        visit(&client, &base, "tasks?q=no%20such%20words").await;
        wait_for_text(&client, "#tasks", "No task matches").await;
        visit(&client, &base, "tasks?from=2099-01-01T00%3A00").await;
        wait_for_text(&client, "#tasks", "No task matches").await;
        visit(&client, &base, "tasks?to=2099-01-01T00%3A00").await;
        wait_for_text(&client, "#tasks", "hello console").await;

        // Operations: the dead job retried.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s
            .store
            .queue
            .get(dead.parse().unwrap())
            .await
            .unwrap()
            .unwrap()
            .state
            .as_str()
            != "dead"
        {
            assert!(std::time::Instant::now() < deadline, "the job never died");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        visit(&client, &base, "operations").await;
        wait_for(&client, &format!("tr[data-job='{dead}'] button"))
            .await
            .click()
            .await
            .unwrap();
        wait_for_text(&client, "#notice.info", "queued again").await;
        shot(&client, "operations").await;

        // Audit: an event's proof verified in the browser.
        visit(&client, &base, "audit").await;
        wait_for(&client, "#audit-events tbody tr button")
            .await
            .click()
            .await
            .unwrap();
        wait_for_text(&client, "#audit-events .verify-result", "verified").await;
        assert!(fits(&client).await, "the audit page is wider than 1280 px");
        shot(&client, "audit").await;
        // By time: nothing was recorded in the future.
        visit(&client, &base, "conversations").await;
        wait_for(&client, "tr[data-conversation='chat-1']").await;
        visit(&client, &base, "audit?from=2099-01-01T00%3A00").await;
        wait_for(&client, "#audit-filters #a-from[value='2099-01-01T00:00']").await;
        assert!(client
            .find_all(Locator::Css("#audit-events tbody tr"))
            .await
            .unwrap()
            .is_empty());

        // The memory, searched within an agent's scope.
        visit(&client, &base, "memory?q=standup&agent=vox").await;
        wait_for_text(&client, "#memory-hits", "Orion room").await;
        wait_for_text(&client, "#memory-hits", "agent vox").await;
        // It links to the event it came from in the audit view, and shows the ids it cites.
        let from = wait_for(&client, "#memory-hits .memory-source a")
            .await
            .attr("href")
            .await
            .unwrap()
            .unwrap();
        assert!(from.starts_with("#/audit?after="), "{from}");
        let cited = wait_for(&client, "#memory-hits .memory-source code.source")
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(cited.len(), 36, "an event id: {cited}");
        shot(&client, "memory").await;
        visit(&client, &base, "memory?q=standup&agent=scribe").await;
        wait_for_text(&client, "#memory-hits", "Nothing remembered matches").await;

        // Conversations: the chat and its message.
        visit(&client, &base, "conversations").await;
        wait_for(&client, "tr[data-conversation='chat-1'] a")
            .await
            .click()
            .await
            .unwrap();
        wait_for_text(&client, "#conversation-messages", "hello from the chat").await;
        // The reply: delivered, and linked to the task it belongs to.
        wait_for_text(
            &client,
            "#conversation-messages [data-seq='2']",
            "hello from the agent",
        )
        .await;
        wait_for_text(
            &client,
            "#conversation-messages [data-seq='2'] .status",
            "delivered",
        )
        .await;
        shot(&client, "conversation").await;
        click(
            &client,
            &format!("#conversation-messages [data-seq='2'] a[href='#/tasks/{answered}']"),
        )
        .await;
        wait_for_text(&client, "#task-summary", "from the chat").await;

        // A room's messages.
        visit(&client, &base, "rooms/lab").await;
        wait_for(&client, "#room-messages").await;
        shot(&client, "room").await;

        // A person: exported, then erased after confirming.
        visit(&client, &base, "subjects").await;
        wait_for(&client, &format!("tr[data-subject='{ana}']")).await;
        shot(&client, "people").await;
        visit(&client, &base, &format!("subjects/{ana}")).await;
        // A consent recorded from the page.
        wait_for(&client, "#c-purpose")
            .await
            .send_keys("newsletter")
            .await
            .unwrap();
        click(&client, "#consent button[type=submit]").await;
        wait_for_text(&client, "#notice.info", "newsletter was recorded as given").await;
        wait_for_text(&client, "#consents", "console").await;
        wait_for(&client, "#export").await.click().await.unwrap();
        wait_for_text(&client, "#notice.info", "export was downloaded").await;
        wait_for(&client, "#erase").await.click().await.unwrap();
        client.send_alert_text(&ana[..8]).await.unwrap();
        client.accept_alert().await.unwrap();
        wait_for_text(&client, "#notice.info", "erased").await;
        wait_for_text(&client, "#subject-state", "erased").await;
        shot(&client, "person").await;
        let (_, erased) = s
            .call(
                reqwest::Method::GET,
                "/v1/subjects/{id}",
                &[("id", &ana)],
                Some(&s.admin),
                None,
            )
            .await;
        assert!(erased["erased"].is_object(), "{erased}");

        // A phone's width: nothing wider than the screen.
        client.set_window_size(390, 844).await.unwrap();
        visit(&client, &base, "tasks").await;
        wait_for_text(&client, "#tasks", "completed").await;
        assert!(fits(&client).await, "the task list is wider than a phone");
        shot(&client, "tasks-phone").await;
        client.set_window_size(1280, 900).await.unwrap();

        // A key that may only read tasks: no operations, no new task, no people.
        click(&client, "#who button").await;
        wait_for(&client, "#signin").await;
        sign_in(&client, &base, &s.reader).await;
        let nav = text_of(&client, "#nav").await;
        assert!(
            nav.contains("Tasks") && !nav.contains("Operations") && !nav.contains("People"),
            "{nav}"
        );
        assert!(client.find(Locator::Css("#new-task")).await.is_err());

        // A key that may only search the memory: no audit view to link to, so the event is
        // named and the ids it cites shown.
        let remembering = s.key("remembering", vec![Scope::MemoryRead]).await;
        click(&client, "#who button").await;
        wait_for(&client, "#signin #key")
            .await
            .send_keys(&remembering)
            .await
            .unwrap();
        click(&client, "#signin button[type=submit]").await;
        wait_for(&client, "#memory-search").await;
        visit(&client, &base, "memory?q=standup&agent=vox").await;
        wait_for_text(&client, "#memory-hits .memory-source", "of the log").await;
        assert!(client
            .find_all(Locator::Css("#memory-hits a"))
            .await
            .unwrap()
            .is_empty());
        assert!(client
            .find(Locator::Css("#memory-hits code.source"))
            .await
            .is_ok());

        let errors = errors_in_console(&client).await;
        assert!(
            errors.is_empty(),
            "errors in the browser's console: {errors:#?}"
        );
        client.close().await.unwrap();
        s.stop().await;
    });
}

/// Traces recorded as a node that exports them records them: a request's `traceparent` is
/// continued, and the commands it issues carry it. Nothing is exported: the ids are what counts.
fn record_traces() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("console")));
    tracing::subscriber::set_global_default(subscriber).unwrap();
}

/// The models, with Vox offered the `echo` tool and calling it once when asked to look it up.
fn models_calling_echo() -> ModelsConfig {
    let mut models = ModelsConfig::default();
    models
        .agents
        .get_mut("vox")
        .unwrap()
        .tools
        .push("echo".into());
    let Some(ProviderConfig::Scripted(scripted)) = models.providers.get_mut("scripted") else {
        panic!("the shipped models have a scripted provider");
    };
    scripted.rules.insert(
        0,
        ScriptRule {
            agent: Some("vox".into()),
            model: None,
            contains: Some("look it up with echo".into()),
            reply: None,
            tool_calls: vec![ScriptedToolCall {
                name: "echo".into(),
                arguments: json!({ "query": "the manual" }),
            }],
            fail: None,
            retryable: true,
            times: Some(1),
        },
    );
    models
}

#[test]
fn a_run_is_followed_live_through_its_timer_tools_wait_and_children() {
    record_traces();
    runtime().block_on(async {
        let s = Server::start(Options {
            workflows: vec![
                Source {
                    file: "timeline.yaml".into(),
                    yaml: TIMELINE.into(),
                },
                Source {
                    file: "timeline_part.yaml".into(),
                    yaml: TIMELINE_PART.into(),
                },
            ],
            models: models_calling_echo(),
            trace_url: Some("http://traces.example/trace/{trace_id}".into()),
            memory: false,
            ..Options::default()
        })
        .await;
        let base = s.base.clone();
        // Created by a caller in a trace of its own.
        let (status, task) = s
            .send(
                "/v1/tasks",
                s.client
                    .post(format!("{base}/v1/tasks"))
                    .bearer_auth(&s.writer)
                    .header("traceparent", TRACEPARENT)
                    .json(&json!({ "input": "/srv", "workflow": "timeline" })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();

        let driver = driver().await;
        let client = browser(&driver).await;
        sign_in(&client, &base, &s.writer).await;
        visit(&client, &base, &format!("tasks/{id}")).await;
        // Followed live: the timer is done, the run waits for its signal.
        let lane = |step: &str| format!("#waterfall details.step[data-step='{step}'] summary");
        wait_for_text(&client, &lane("approve"), "(waits for a signal) running").await;
        wait_for_text(&client, &lane("pause"), "(timer) completed").await;
        wait_for_text(&client, "#live", "following live").await;
        assert!(client
            .find(Locator::Css("#live[data-finished]"))
            .await
            .is_err());
        shot(&client, "task-live").await;

        // The signal, sent over the API, lets it fan out and finish, on the page as it happens.
        let (status, accepted) = s
            .call(
                reqwest::Method::POST,
                "/v1/tasks/{id}/signals/{name}",
                &[("id", &id), ("name", "go")],
                Some(&s.writer),
                Some(json!({ "payload": { "parts": ["left", "right"] } })),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        wait_for(&client, "#live[data-finished='true']").await;
        wait_for_text(&client, "#task-summary", "completed").await;
        wait_for_text(&client, &lane("approve"), "(signalled) completed").await;
        wait_for_text(&client, &lane("parts"), "(2 child runs) completed").await;
        let outcomes = client
            .execute(
                "return [...document.querySelectorAll('#waterfall details.step')]
                   .map((lane) => lane.dataset.step + ' ' + lane.querySelector('summary .status').textContent);",
                vec![],
            )
            .await
            .unwrap();
        let outcomes: Vec<String> = serde_json::from_value(outcomes).unwrap();
        for step in ["pause", "shell", "look", "approve", "parts", "send"] {
            assert!(
                outcomes.contains(&format!("{step} completed")),
                "{outcomes:?}"
            );
        }
        let parts = outcomes.iter().filter(|o| *o == "part completed").count();
        assert_eq!(parts, 2, "a lane per child run: {outcomes:?}");
        wait_for_text(&client, "#waterfall", "child parts.1 · part").await;
        shot(&client, "timeline-finished").await;
        assert!(
            outcomes.iter().all(|o| !o.ends_with("running")),
            "{outcomes:?}"
        );

        // The tool step's input (the command) beside its output.
        click(&client, &lane("shell")).await;
        wait_for_text(
            &client,
            "#waterfall details.step[data-step='shell'][open] .step-input",
            "ls -l /srv",
        )
        .await;
        // The agent's tool call, with its arguments.
        click(&client, &lane("look")).await;
        wait_for_text(
            &client,
            "#waterfall details.step[data-step='look'][open] .tool-call summary",
            "echo",
        )
        .await;
        click(
            &client,
            "#waterfall details.step[data-step='look'] .tool-call summary",
        )
        .await;
        wait_for_text(
            &client,
            "#waterfall details.step[data-step='look'] .tool-call[open]",
            "the manual",
        )
        .await;
        shot(&client, "timeline-steps").await;

        // The run links to the trace its request continued.
        let trace = wait_for(&client, "#task-trace a")
            .await
            .attr("href")
            .await
            .unwrap();
        assert_eq!(
            trace.as_deref(),
            Some("http://traces.example/trace/4bf92f3577b34da6a3ce929d0e0e4736")
        );

        let errors = errors_in_console(&client).await;
        assert!(
            errors.is_empty(),
            "errors in the browser's console: {errors:#?}"
        );
        client.close().await.unwrap();
        s.stop().await;
    });
}

/// The session is a cookie that only this origin's pages can use to change anything.
#[test]
fn the_console_session_is_a_cookie_guarded_against_cross_site_requests() {
    runtime().block_on(async {
        let s = Server::start(Options::default()).await;
        let http = reqwest::Client::new();
        let url = |path: &str| format!("{}{path}", s.base);
        // Not signed in: nothing to say, not an error.
        let response = http.get(url("/console/session")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        // A key that is not valid.
        let response = http
            .post(url("/console/session"))
            .json(&json!({ "key": "stele_nope" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // Signing in: the cookie is HttpOnly and SameSite=Strict; the answer holds the scopes.
        let response = http
            .post(url("/console/session"))
            .json(&json!({ "key": s.writer }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let session: Value = response.json().await.unwrap();
        assert_eq!(session["scopes"], json!(["tasks:read", "tasks:write"]));
        let csrf = session["csrf"].as_str().unwrap().to_owned();
        let jar = cookie.split(';').next().unwrap().to_owned();
        // Reading with the cookie alone.
        let response = http
            .get(url("/v1/tasks"))
            .header("cookie", &jar)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // Changing: refused without the token, or from another origin; done with it.
        let create = || {
            http.post(url("/v1/tasks"))
                .header("cookie", &jar)
                .json(&json!({ "input": "from the console", "workflow": "assistant" }))
        };
        for request in [
            create(),
            create().header("x-csrf-token", "0".repeat(64)),
            create()
                .header("x-csrf-token", &csrf)
                .header("origin", "http://evil.example"),
        ] {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["code"], "csrf_failed");
        }
        let response = create().header("x-csrf-token", &csrf).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        // Signing out clears the cookie.
        let response = http
            .delete(url("/console/session"))
            .header("cookie", &jar)
            .header("x-csrf-token", &csrf)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0"));
        // The page itself: served with a policy that allows only itself.
        let response = http.get(url("/")).send().await.unwrap();
        assert_eq!(response.url().path(), "/console/");
        assert!(response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'"));
        s.stop().await;
    });
}
