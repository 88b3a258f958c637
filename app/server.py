"""``fastface app``: a local web app over a store (standard-library HTTP server, pages rendered here).

Routes: ``/explore`` (fronts, a configuration's gallery), ``/compare`` (one identity, prompt
and seed across presets and λ), ``/generate`` (GET: the form; POST: images), ``/report``
(the run's ``report.html`` from the store: what the Prefect report artifact links to),
``/image`` and ``/photo`` (image bytes), ``/health``.

Every handler turns a user error (unknown run, empty or missing store, a photo without a
face) into a message on the page with status 200/400 and keeps serving; an unexpected error
is one line on the page (its traceback goes to the server's stderr only).

Why not Gradio (the field's usual demo library): measured here, ``import gradio`` takes 13–15 s
and 181 MB RSS on this 2-core machine (vs 1.2 s / 104 MB for this server's imports), and
installing it would move pillow and add pandas 3 in the environment the evaluation shares.
A server-rendered page is also driven by a plain browser test without a JavaScript queue.
"""

from __future__ import annotations

import email.parser
import email.policy
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from app import pages
from app.data import PROMPT_SETS, AppError, Config, StoreReader
from evaluation.pareto import FRONT_METRICS  # the x axes: CLIP, AE, IR

MAX_UPLOAD_BYTES = 20 * 2**20
PAGE_SIZE = 12


class App:
    """The app's state: one :class:`StoreReader` and the generation options."""

    def __init__(self, root: str, *, cache_dir: str | None = None, device: str | None = None) -> None:
        self.reader = StoreReader(root)
        self.cache_dir = cache_dir
        self.device = device

    # -- tabs ---------------------------------------------------------------------------------
    def explore(self, q: dict[str, str], multi: dict[str, list[str]]) -> str:
        run = self.reader.check_run(q.get("run"))
        options = self.reader.options(run)
        prompt_set = q.get("set") or "joint"
        identity = q.get("identity", "")
        presets = [p for p in multi.get("preset", []) if p]
        unknown = [p for p in presets if p not in options["preset"]]
        if unknown:
            raise AppError(f"run {run!r} has no preset {', '.join(unknown)}; its presets: {', '.join(options['preset'])}")
        if identity and identity not in options["identity_id"]:
            raise AppError(f"run {run!r} has no identity {identity!r}")
        x_metric = q.get("x") or "clip"
        if x_metric not in FRONT_METRICS:
            raise AppError(f"unknown metric {x_metric!r}; choose {', '.join(FRONT_METRICS)}")
        form = ("<form class='filters' method='get' action='/explore'>"
                f"<label>run {pages.select('run', self.reader.runs(), run)}</label>"
                f"<label>prompt set {pages.select('set', list(PROMPT_SETS), prompt_set)}</label>"
                f"<label>identity {pages.select('identity', options['identity_id'], identity, blank='all')}</label>"
                f"<label>x axis {pages.select('x', FRONT_METRICS, x_metric)}</label>"
                f"presets {pages.checkboxes('preset', options['preset'], presets or options['preset'])}"
                "<button type='submit' id='apply'>show</button></form>")
        rows = self.reader.front_rows(run, prompt_set=prompt_set, identity=identity, presets=presets)
        common = dict(run=run, set=prompt_set, identity=identity, x=x_metric, preset=presets)

        def href(model, preset, lora, scale):
            return pages.link("/explore", **common, model=model, cpreset=preset, lora=f"{lora:g}", lam=f"{scale:g}") + "#gallery"

        body = form + pages.fronts_html(rows, x_metric=x_metric, href=href)
        if q.get("model"):
            body += self._gallery(run, q, common, prompt_set, identity)
        return pages.page("explore", body, run=run)

    def _gallery(self, run, q, common, prompt_set, identity) -> str:
        try:
            config = Config(q["model"], q["cpreset"], float(q["lora"]), float(q["lam"]))
            page_no = int(q.get("page") or 0)
        except (KeyError, ValueError):
            raise AppError("a gallery needs model, cpreset, lora and lam (numbers); click a point of a front") from None
        examples, total = self.reader.gallery(run, config, identity=identity, prompt_set=prompt_set, page=page_no,
                                              page_size=PAGE_SIZE)
        title = (f"{config.model} · {config.preset} · LoRA {config.lora_scale:g} · λ {config.ip_adapter_scale:g}: "
                 f"{total} images")
        if not examples:
            return f"<h2 id='gallery'>{pages.esc(title)}</h2><p class='msg'>no images on this page</p>"
        nav = []
        here = dict(common, model=config.model, cpreset=config.preset, lora=q["lora"], lam=q["lam"])
        if page_no > 0:
            nav.append(f"<a id='prev-page' href='{pages.esc(pages.link('/explore', **here, page=page_no - 1))}#gallery'>← previous</a>")
        if (page_no + 1) * PAGE_SIZE < total:
            nav.append(f"<a id='next-page' href='{pages.esc(pages.link('/explore', **here, page=page_no + 1))}#gallery'>next →</a>")
        cards = "".join(pages.card(e, run=run, caption=f"<b>{pages.esc(e['identity_id'])}</b> · {pages.esc(e['prompt_kind'])} "
                                                       f"· seed {e['seed']}<br><i>{pages.esc(e['prompt'])}</i>")
                        for e in examples)
        return (f"<h2 id='gallery'>{pages.esc(title)} (page {page_no + 1} of {max(1, -(-total // PAGE_SIZE))})</h2>"
                f"<p>{' · '.join(nav)}</p><div class='cards' id='gallery-cards'>{cards}</div>")

    def compare(self, q: dict[str, str], multi: dict[str, list[str]]) -> str:
        run = self.reader.check_run(q.get("run"))
        o = self.reader.options(run)
        prompts = {p["prompt_id"]: p for p in o["prompts"]}
        model = q.get("model") or o["model"][0]
        identity = q.get("identity") or o["identity_id"][0]
        prompt_id = q.get("prompt") or next(iter(prompts))
        for name, value, allowed in (("model", model, o["model"]), ("identity", identity, o["identity_id"]),
                                     ("prompt", prompt_id, list(prompts))):
            if value not in allowed:
                raise AppError(f"run {run!r} has no {name} {value!r}")
        seeds = self.reader.seeds(run, identity, prompt_id)
        try:
            lora = float(q.get("lora") or max(o["lora_scale"]))
            seed = int(q.get("seed") or (seeds[0] if seeds else 0))
        except ValueError:
            raise AppError("lora and seed must be numbers") from None
        presets = [p for p in multi.get("preset", []) if p]
        form = ("<form class='filters' method='get' action='/compare'>"
                f"<label>run {pages.select('run', self.reader.runs(), run)}</label>"
                f"<label>model {pages.select('model', o['model'], model)}</label>"
                f"<label>LoRA {pages.select('lora', [f'{v:g}' for v in o['lora_scale']], f'{lora:g}')}</label>"
                f"<label>identity {pages.select('identity', o['identity_id'], identity)}</label>"
                f"<label>prompt {pages.select('prompt', list(prompts), prompt_id)}</label>"
                f"<label>seed {pages.select('seed', seeds, seed)}</label>"
                f"presets {pages.checkboxes('preset', o['preset'], presets or o['preset'])}"
                "<button type='submit' id='apply'>compare</button></form>")
        examples = self.reader.compare(run, identity=identity, prompt_id=prompt_id, seed=seed, model=model,
                                       lora_scale=lora, presets=presets)
        title = (f"{identity} · “{prompts[prompt_id]['prompt']}” ({prompts[prompt_id]['prompt_kind']}) · seed {seed} · "
                 f"{model} · LoRA {lora:g}")
        scales = sorted({e["ip_adapter_scale"] for e in examples})
        rows = []
        for preset in sorted({e["preset"] for e in examples}):
            cells = {e["ip_adapter_scale"]: e for e in examples if e["preset"] == preset}
            rows.append(f"<tr><th>{pages.esc(preset)}</th>" + "".join(
                f"<td>{pages.card(cells[s], run=run, caption=f'{pages.esc(preset)} · λ {s:g}') if s in cells else '–'}</td>"
                for s in scales) + "</tr>")
        table = (f"<table id='comparison'><tr><th>preset \\ λ</th>{''.join(f'<th>{s:g}</th>' for s in scales)}</tr>"
                 f"{''.join(rows)}</table>" if examples else "<p class='msg'>nothing stored for this selection</p>")
        return pages.page("compare", form + f"<h2>{pages.esc(title)}</h2>" + table, run=run)

    def generate_form(self, q: dict[str, str], result: str = "", message: str = "", chosen: dict | None = None) -> str:
        from app import generate

        chosen = chosen or {}
        try:
            identities = self.reader.identities()
        except AppError:
            identities = []  # generating from an uploaded photo needs no store
        models = generate.models()
        default_model = chosen.get("model") or ("tiny-hyper" if "tiny-hyper" in models else models[0])
        ident = "".join(f"<option value='{pages.esc(i['content_hash'])}'>{pages.esc(i['identity_id'])}</option>"
                        for i in identities)
        form = ("<form class='filters' method='post' action='/generate' enctype='multipart/form-data' id='generate-form'>"
                "<label>face photo <input type='file' name='photo' id='photo' accept='image/*'></label>"
                f"<label>or a stored identity <select name='identity' id='sel-identity'><option value=''>—</option>{ident}"
                "</select></label><br>"
                f"<label>prompt <input type='text' name='prompt' id='prompt' size='60' "
                f"value='{pages.esc(chosen.get('prompt', 'a photo of a person in a garden'))}'></label><br>"
                f"<label>model {pages.select('model', models, default_model)}</label>"
                f"presets {pages.checkboxes('preset', generate.presets(), chosen.get('presets') or ['baseline', 'ff-am2'])}"
                f"<label>λ <input type='text' name='lam' size='4' value='{pages.esc(chosen.get('lam', generate.default_lambda()))}'></label>"
                f"<label>seed <input type='text' name='seed' size='6' value='{pages.esc(chosen.get('seed', '0'))}'></label>"
                "<button type='submit' id='run-generate'>generate</button></form>")
        return pages.page("generate", form + result, run=q.get("run", ""), message=message)

    def generate_post(self, fields: dict[str, Any]) -> str:
        from app import generate

        chosen = {"prompt": fields.get("prompt", ""), "model": fields.get("model", ""), "presets": fields.get("preset", []),
                  "lam": fields.get("lam") or generate.default_lambda(), "seed": fields.get("seed", "0")}
        try:
            photo = fields.get("photo") or b""
            if not photo and fields.get("identity"):
                photo = self.reader.identity_photo(fields["identity"])
            try:
                lam, seed = float(chosen["lam"]), int(chosen["seed"])
            except ValueError:
                raise AppError("λ must be a number and seed a whole number") from None
            request = generate.Request(photo=photo, prompt=chosen["prompt"], model=chosen["model"],
                                       presets=tuple(chosen["presets"]), ip_adapter_scale=lam, seed=seed)
            images = generate.generate(request, cache_dir=self.cache_dir, device=self.device)
        except (ValueError, LookupError, FileNotFoundError) as exc:
            return self.generate_form({}, message=_one_line(exc), chosen=chosen)
        cards = "".join(pages.png_card(preset, png) for preset, png in images)
        result = (f"<h2>{pages.esc(request.model)} · “{pages.esc(request.prompt)}” · λ {lam:g} · seed {seed}</h2>"
                  f"<div class='cards'>{pages.photo_card(photo)}<div class='cards' id='generated'>{cards}</div></div>")
        return self.generate_form({}, result=result, chosen=chosen)

    def report(self, q: dict[str, str]) -> bytes:
        run = self.reader.check_run(q.get("run"))
        return self.reader.report_html(run)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _query(url: str) -> tuple[str, dict[str, str], dict[str, list[str]]]:
    parsed = urlparse(url)
    multi = parse_qs(parsed.query, keep_blank_values=True)
    return parsed.path, {k: v[-1] for k, v in multi.items()}, multi


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Fields of a multipart/form-data body: text as str (repeated names as lists for ``preset``), files as bytes."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise AppError("the form was not sent as multipart/form-data")
    fields: dict[str, Any] = {"preset": []}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            fields[name] = payload
        elif name == "preset":
            fields["preset"].append(payload.decode("utf-8"))
        else:
            fields[name] = payload.decode("utf-8")
    return fields


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        app: App = None  # set below: the state every request shares

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            sys.stderr.write("app: " + (format % args) + "\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if content_type.startswith("text/html") else "max-age=3600")
            self.end_headers()
            self.wfile.write(body)

        def _guard(self, tab: str, work: Callable[[], tuple[int, bytes, str]]) -> None:
            try:
                status, body, kind = work()
            except AppError as exc:
                status, body, kind = 200, pages.page(tab, "", message=str(exc)).encode(), "text/html; charset=utf-8"
            except (ValueError, LookupError, FileNotFoundError) as exc:
                status, body, kind = 400, pages.page(tab, "", message=_one_line(exc)).encode(), "text/html; charset=utf-8"
            except Exception as exc:  # noqa: BLE001 - the app keeps serving; details on the server's stderr
                traceback.print_exc(file=sys.stderr)
                status, body = 500, pages.page(tab, "", message=f"internal error: {type(exc).__name__}: "
                                                                 f"{_one_line(exc)}").encode()
                kind = "text/html; charset=utf-8"
            self._send(status, body, kind)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path, q, multi = _query(self.path)
            tab = path.strip("/").split("/")[0] or "explore"
            html = "text/html; charset=utf-8"
            routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {
                "explore": lambda: (200, app.explore(q, multi).encode(), html),
                "compare": lambda: (200, app.compare(q, multi).encode(), html),
                "generate": lambda: (200, app.generate_form(q).encode(), html),
                "report": lambda: (200, app.report(q), html),
                "image": lambda: (200, app.reader.image_bytes(q.get("run", ""), q.get("example", "")), "image/png"),
                "photo": lambda: (200, app.reader.identity_photo(q.get("hash", "")), "image/png"),
                "health": lambda: (200, b"ok", "text/plain"),
            }
            if tab not in routes:
                self._send(404, pages.page("explore", "", message=f"no page {path!r}; the tabs are /explore, /compare, "
                                                                  "/generate, /report").encode())
                return
            self._guard(tab, routes[tab])

        def do_POST(self) -> None:  # noqa: N802
            path, _, _ = _query(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if path.rstrip("/") != "/generate":
                self.rfile.read(length)
                self._send(404, pages.page("generate", "", message="only /generate takes a form").encode())
                return
            if length > MAX_UPLOAD_BYTES:
                self.rfile.read(length)
                self._send(413, pages.page("generate", "", message=f"the upload is larger than "
                                                                   f"{MAX_UPLOAD_BYTES // 2**20} MiB").encode())
                return
            body = self.rfile.read(length)
            self._guard("generate", lambda: (200, app.generate_post(
                parse_multipart(self.headers.get("Content-Type", ""), body)).encode(), "text/html; charset=utf-8"))

    Handler.app = app
    return Handler


def make_server(root: str, host: str = "127.0.0.1", port: int = 0, **options: Any) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (0: a free port; ``server.server_address`` says which); not yet serving."""
    server = ThreadingHTTPServer((host, port), make_handler(App(root, **options)))
    server.daemon_threads = True
    return server


def serve_in_thread(root: str, **options: Any) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread (tests, notebooks); returns the server and its base URL."""
    server = make_server(root, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"


__all__ = ["App", "make_server", "parse_multipart", "serve_in_thread"]
