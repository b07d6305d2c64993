#!/usr/bin/env python3
"""A fake Telegram Bot API for tests, on loopback, speaking the real JSON (standard library only).

Serves POST/GET /bot<TOKEN>/<method> (method names case-insensitive, as Telegram's) with the real
{"ok": .., "result": ..} envelopes: getMe, getWebhookInfo, deleteWebhook, setWebhook, getUpdates
(long poll; an offset confirms the updates below it, as Telegram's does), sendMessage,
editMessageText, sendChatAction, sendDocument, getFile, setMyCommands, deleteMessage, and file
downloads at /file/bot<TOKEN>/<path>.

Test control (JSON bodies):
  POST /_test/update  {"chat_id": 42, "user_id": 42, "text": "hi", "chat_type": "private"}
                      or {"raw": {...}} for an update as given (update_id added when missing)
  POST /_test/fail    {"method": "sendMessage", "chat_id": 9, "times": 2, "error_code": 429,
                       "description": "Too Many Requests: retry after 1", "retry_after": 1}
                      or {"method": "sendMessage", "times": 1, "drop": true} (connection closed)
  POST /_test/file    {"file_id": "f1", "base64": "..."}: a file getFile and downloads serve
  POST /_test/clear   no more failures
  GET  /_test/calls   every API call so far: [{"method", "params", "t", "ok"}] (ok: answered ok)
  GET  /_test/pending updates not confirmed yet
Usage: fake_telegram.py PORT   (prints "ready" once listening)
"""
import base64
import email.parser
import email.policy
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BOT_USER = {"id": 123456, "is_bot": True, "first_name": "Stele", "username": "stele_test_bot"}
ME = dict(BOT_USER, can_join_groups=True, can_read_all_group_messages=False,
          supports_inline_queries=False, can_connect_to_business=False, has_main_web_app=False)
KNOWN = ["getMe", "getWebhookInfo", "deleteWebhook", "setWebhook", "sendChatAction",
         "setMyCommands", "deleteMessage", "getUpdates", "sendMessage", "editMessageText",
         "sendDocument", "getFile", "answerCallbackQuery"]

lock = threading.Condition()
updates, calls, sent, failures, files = [], [], {}, [], {}
counters = {"update": 1000, "message": 1}
webhook = {"url": ""}


def chat(chat_id, kind="private"):
    if kind == "private":
        return {"id": chat_id, "type": "private", "first_name": "Tester", "username": f"t{chat_id}"}
    return {"id": chat_id, "type": kind, "title": f"Group {chat_id}"}


def user(uid):
    return {"id": uid, "is_bot": False, "first_name": "Tester", "last_name": str(uid),
            "username": f"u{uid}", "language_code": "en"}


class ApiError(Exception):
    def __init__(self, code, description, parameters=None):
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


class Drop(Exception):
    pass


def failure_for(method, p):
    with lock:
        for f in failures:
            if "chat_id" in f and str(f["chat_id"]) != str(p.get("chat_id")):
                continue
            if f["method"].lower() == method.lower() and f["times"] > 0:
                f["times"] -= 1
                if f.get("drop"):
                    raise Drop()
                params = {"retry_after": f["retry_after"]} if "retry_after" in f else None
                raise ApiError(f.get("error_code", 400), f.get("description", "Bad Request"), params)


def api(method, p):
    method = {n.lower(): n for n in KNOWN}.get(method.lower(), method)
    failure_for(method, p)
    if method == "getMe":
        return ME
    if method == "getWebhookInfo":
        return {"url": webhook["url"], "has_custom_certificate": False,
                "pending_update_count": len(updates)}
    if method == "setWebhook":
        webhook["url"] = p.get("url", "")
        return True
    if method == "deleteWebhook":
        webhook["url"] = ""
        return True
    if method in ("sendChatAction", "setMyCommands", "deleteMessage", "answerCallbackQuery"):
        return True
    if method == "getUpdates":
        if webhook["url"]:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        offset = int(p.get("offset") or 0)
        timeout = min(float(p.get("timeout") or 0), 10.0)
        limit = int(p.get("limit") or 100)
        deadline = time.time() + timeout
        with lock:
            if offset:
                updates[:] = [u for u in updates if u["update_id"] >= offset]
            while not updates and time.time() < deadline:
                lock.wait(deadline - time.time())
            return updates[:limit]
    if method in ("sendMessage", "sendDocument"):
        with lock:
            mid = counters["message"]
            counters["message"] += 1
            cid = int(p["chat_id"])
            m = {"message_id": mid, "date": int(time.time()), "chat": chat(cid), "from": BOT_USER}
            if method == "sendMessage":
                if not str(p.get("text", "")).strip():
                    raise ApiError(400, "Bad Request: message text is empty")
                if len(str(p["text"]).encode("utf-16-le")) // 2 > 4096:
                    raise ApiError(400, "Bad Request: message is too long")
                m["text"] = p["text"]
            else:
                doc = p.get("document") or {}
                m["document"] = {"file_id": f"doc{mid}", "file_unique_id": f"u{mid}",
                                 "file_name": doc.get("filename", "file"),
                                 "file_size": doc.get("size", 0)}
            sent[(cid, mid)] = m
            return m
    if method == "editMessageText":
        with lock:
            m = sent.get((int(p["chat_id"]), int(p["message_id"])))
            if m is None:
                raise ApiError(400, "Bad Request: message to edit not found")
            if m.get("text") == p["text"]:
                raise ApiError(400, "Bad Request: message is not modified: specified new message "
                                    "content and reply markup are exactly the same as a current "
                                    "content and reply markup of the message")
            m.update(text=p["text"], edit_date=int(time.time()))
            return m
    if method == "getFile":
        fid = p.get("file_id")
        if fid not in files:
            raise ApiError(400, "Bad Request: invalid file_id")
        return {"file_id": fid, "file_unique_id": fid, "file_size": len(files[fid]),
                "file_path": f"documents/{fid}"}
    raise ApiError(404, "Not Found: method not found")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, obj, raw=None):
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def params(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        ct = self.headers.get("Content-Type", "")
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        if "json" in ct and body:
            q.update(json.loads(body))
        elif "x-www-form-urlencoded" in ct:
            q.update(urllib.parse.parse_qsl(body.decode()))
        elif "multipart/form-data" in ct and body:
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ct.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True) or b""
                if part.get_filename():
                    q[name] = {"filename": part.get_filename(), "size": len(payload),
                               "content": payload.decode("utf-8", "replace")}
                else:
                    q[name] = payload.decode()
        return q

    def handle_any(self):
        path = urllib.parse.urlsplit(self.path).path
        p = self.params()
        if path == "/_test/update":
            with lock:
                raw = p.get("raw")
                if raw is None:
                    uid = counters["update"]
                    cid = int(p.get("chat_id", 42))
                    sender = int(p.get("user_id", cid))
                    raw = {"update_id": uid, "message": {
                        "message_id": 10000 + uid, "date": int(time.time()),
                        "chat": chat(cid, p.get("chat_type", "private")), "from": user(sender),
                        "text": p.get("text", "hi")}}
                raw.setdefault("update_id", counters["update"])
                counters["update"] = max(counters["update"], raw["update_id"]) + 1
                updates.append(raw)
                lock.notify_all()
            return self.reply(200, {"ok": True, "update_id": raw["update_id"]})
        if path == "/_test/file":
            with lock:
                files[p["file_id"]] = base64.b64decode(p["base64"])
            return self.reply(200, {"ok": True})
        if path == "/_test/fail":
            with lock:
                failures.append(dict(p, times=int(p.get("times", 1))))
            return self.reply(200, {"ok": True})
        if path == "/_test/calls":
            with lock:
                return self.reply(200, calls)
        if path == "/_test/clear":
            with lock:
                failures.clear()
            return self.reply(200, {"ok": True})
        if path == "/_test/failures":
            with lock:
                return self.reply(200, failures)
        if path == "/_test/pending":
            with lock:
                return self.reply(200, updates)
        if path.startswith("/file/bot"):
            # (teloxide sends the file path as one segment: its slashes come as %2F.)
            fid = urllib.parse.unquote(path).rsplit("/", 1)[1]
            with lock:
                content = files.get(fid)
            if content is None:
                return self.reply(404, {"ok": False, "error_code": 404, "description": "Not Found"})
            return self.reply(200, None, raw=content)
        if not path.startswith("/bot") or path.count("/") != 2:
            return self.reply(404, {"ok": False, "error_code": 404, "description": "Not Found"})
        method = path.rsplit("/", 1)[1]
        call = {"method": method, "params": p, "t": time.time(), "ok": False}
        with lock:
            calls.append(call)
        try:
            result = api(method, p)
            call["ok"] = True
            return self.reply(200, {"ok": True, "result": result})
        except Drop:
            self.close_connection = True
            self.connection.shutdown(2)
        except ApiError as e:
            body = {"ok": False, "error_code": e.code, "description": e.description}
            if e.parameters:
                body["parameters"] = e.parameters
            # Telegram answers 429 and 4xx with their code; teloxide reads the body either way.
            return self.reply(e.code, body)

    do_GET = do_POST = handle_any


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18081
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
