//! The console in a real browser: headless Chromium driven over WebDriver (ChromeDriver), against
//! a real server. It signs in, creates a task and watches it finish live, opens its timeline and
//! a model call, retries a dead job, verifies an event's inclusion proof in the browser, exports
//! and erases a person, shows only what a key's scopes allow, fits a phone's width — with no
//! error in the browser's console. A screenshot of each main page is kept under the build's
//! temporary folder (`console-screenshots/`). The session's cookie and CSRF rules are checked
//! over plain HTTP.

mod support;

use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{json, Value};
use stele_engine::queue::NewJob;
use support::{Options, Server};

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

        // A chat as the Telegram channel leaves it.
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
        }

        let driver = driver().await;
        let client = browser(&driver).await;

        // Signing in, with the key field focused for the keyboard.
        client.goto(&format!("{base}/")).await.unwrap();
        wait_for(&client, "#signin #key").await;
        let focused = client
            .execute("return document.activeElement.id", vec![])
            .await
            .unwrap();
        assert_eq!(focused, "key");
        shot(&client, "sign-in").await;
        sign_in(&client, &base, &s.admin).await;

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
        shot(&client, "conversation").await;

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
        let fits = client
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(fits, true);
        shot(&client, "tasks-phone").await;
        client.set_window_size(1280, 900).await.unwrap();

        // A key that may only read tasks: no operations, no new task, no people.
        click(&client, "#who button").await;
        wait_for(&client, "#signin").await;
        sign_in(&client, &base, &s.reader).await;
        let nav = client
            .find(Locator::Css("#nav"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            nav.contains("Tasks") && !nav.contains("Operations") && !nav.contains("People"),
            "{nav}"
        );
        assert!(client.find(Locator::Css("#new-task")).await.is_err());

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
