"""`minivar --model X --serve`: the live attention explorer, on the standard library's HTTP server.

The model loads once. The page at / uploads an image with a question and the methods' settings (POST /run: the
image file is the body, the settings the query string, spelled as the command line's flags), runs one generation
with --save-attention into a temporary folder, and shows that run's explorer.html (GET /runs/<id>/explorer.html).

  - binds 127.0.0.1 unless --host says otherwise (then it warns: anyone who can reach the port can run the model);
  - one generation at a time: a request that arrives while one runs gets 503 and "busy" at once;
  - an upload over MAX_UPLOAD bytes (413), one that is not an image, an unknown or bad setting, a request without
    a length (4xx): one clear message (JSON {"error": ...}); the server stays up;
  - every run's files live in one temporary folder, removed when the server stops (Ctrl-C or SIGTERM: exit 0;
    only the last KEEP_RUNS runs are kept while it runs).
"""
from __future__ import annotations

import io
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .errors import MinivarError, for_command_line

# The command line lends the server its parser and its flags → methods translation (cli.main passes them to
# serve(); importing cli here would make the two modules import each other).

MAX_UPLOAD = 20 * 1024 * 1024          # bytes of one uploaded image (docs/explorer.md)
KEEP_RUNS = 16                          # runs whose files stay served; older ones are deleted
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# the command line's flags a request may set (query keys, without the dashes): True = takes no value. The model's
# own (--model, --device, --dtype, --min-pixels, --max-pixels) are the server's, fixed when it loads.
SETTINGS = {"max-new-tokens": False, "temperature": False, "top-p": False, "seed": False, "conv-mode": False,
            "prompt-tokenization": False,
            "image-aspect-ratio": False,
            "var": True, "var-preset": False, "tau": False, "rho": False, "p": False, "min-image-attention": False,
            "sink-dims": False, "var-rule": False, "var-heads": False, "var-layers": False,
            "damro": True, "damro-preset": False, "damro-alpha": False, "damro-beta": False, "damro-topk": False,
            "vcd": True, "vcd-alpha": False, "vcd-beta": False, "vcd-noise-step": False,
            "attention-layers": False, "mask-visual-sinks": True, "mask-random-image-tokens": False}
RUN_FILES = re.compile(r"^/runs/([0-9a-f]{32})/([A-Za-z0-9_.-]+\.(?:html|png|json))$")
MAX_NEW_TOKENS = 64                     # a request's default answer length (it may ask for another)
PORT = 8765
# the command line's flags (argparse dests) that --serve itself reads: the model's, once; every other is per request
SERVER_FLAGS = {"help", "serve", "host", "port", "model", "device", "dtype", "min_pixels", "max_pixels"}


class Stop(BaseException):
    """SIGTERM, raised in the main thread so the server shuts down as on Ctrl-C."""


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def request_args(query: str, out_dir: Path, defaults: dict, build_parser):
    """The query string's settings as the command line's parsed flags (build_parser: its parser and checks, so a
    setting means what its flag means), with the question and the run's folder (the image is the request's body)."""
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    prompt = None
    argv = []
    seen = set()
    for key, value in pairs:
        if key in seen:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"setting '{key}' is given twice")
        seen.add(key)
        if key == "prompt":
            prompt = value
        elif key not in SETTINGS:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown setting '{key}' (known: prompt, "
                                                     f"{', '.join(SETTINGS)})")
        elif SETTINGS[key]:
            if value not in ("", "1", "true", "on"):
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"setting '{key}' takes no value (got '{value}')")
            argv.append(f"--{key}")
        else:
            argv += [f"--{key}", value]
    if prompt is None or not prompt.strip():
        raise BadRequest(HTTPStatus.BAD_REQUEST, "no question: give prompt=... in the query string")
    if "max-new-tokens" not in seen:
        argv += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    argv = ["--prompt", prompt, "--save-attention", str(out_dir)] + argv
    for key, value in defaults.items():            # the server's own: --model, --device, --dtype
        argv += [f"--{key}", value]
    parser = build_parser()

    def refuse(message):
        raise BadRequest(HTTPStatus.BAD_REQUEST, message)
    parser.error = refuse
    return parser.parse_args(argv)


def read_image(body: bytes):
    """The upload as RGB, decoded now, as the command line reads an image file (processing.load_image)."""
    from PIL import Image

    from .processing import to_rgb
    try:
        with Image.open(io.BytesIO(body)) as im:
            im.load()
            return to_rgb(im)
    except MinivarError as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"the upload: {e}") from None
    except Exception as e:                     # PIL signals a bad file with many types, as in load_image
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"the upload is not an image minivar can read "
                                                 f"({type(e).__name__})") from None


def generate(llava, args, image, method_settings) -> dict:
    """One run of the command line's generation with --save-attention (cli.run's steps on a loaded model);
    method_settings: the command line's flags → (methods, the pictures' sink rule)."""
    from .flags import check_seed_applies, var_of
    from .inspection import RunInspection
    from .pipeline import check_generation_args
    check_generation_args(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    methods, rule = method_settings(args)
    check_seed_applies(args.seed, args.temperature, methods,
                       uses=(("--mask-random-image-tokens", args.mask_random_image_tokens is not None),))
    var = var_of(methods)
    inspection = RunInspection.from_args(args)
    capture, mask = inspection.hooks(llava, var)
    notes = []
    request = llava.prepare([image], [args.prompt], conv_mode=args.conv_mode,
                            image_aspect_ratio=args.image_aspect_ratio, max_new_tokens=args.max_new_tokens,
                            methods=methods, sink_config=rule if var is None else None, capture=capture,
                            mask=mask, warn=notes.append, prompt_tokenization=args.prompt_tokenization)
    out = llava.run(request, temperature=args.temperature, top_p=args.top_p, seed=args.seed)[0]
    image_mode = args.image_aspect_ratio or llava.family.default_image_mode
    inspection.finish(llava, out, image, image_mode, var, args.prompt)
    return {"text": out.text, "output_ids": out.output_ids, "notes": notes, "reports": out.reports}


class Server:
    """The loaded model, the run folder and the one-generation lock, shared by the request handlers."""

    def __init__(self, llava, root: Path, defaults: dict, build_parser=None, method_settings=None):
        self.llava, self.root, self.defaults = llava, root, defaults
        self.build_parser, self.method_settings = build_parser, method_settings
        self.lock = threading.Lock()
        self.runs: list[str] = []

    def run(self, query: str, body: bytes) -> dict:
        if not self.lock.acquire(blocking=False):
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE,
                             "busy: one generation runs at a time; send the request again when it has finished")
        try:
            image = read_image(body)
            run_id = uuid.uuid4().hex
            out_dir = self.root / run_id
            try:
                args = request_args(query, out_dir, self.defaults, self.build_parser)
                result = generate(self.llava, args, image, self.method_settings)
            except MinivarError as e:
                shutil.rmtree(out_dir, ignore_errors=True)
                raise BadRequest(HTTPStatus.UNPROCESSABLE_ENTITY, for_command_line(str(e))) from None
            self.runs.append(run_id)
            while len(self.runs) > KEEP_RUNS:
                shutil.rmtree(self.root / self.runs.pop(0), ignore_errors=True)
            return dict(result, id=run_id, explorer=f"/runs/{run_id}/explorer.html")
        finally:
            self.lock.release()


def handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        server_version = "minivar"

        def log_message(self, fmt, *args):        # one line per request on stderr
            print(f"minivar: {self.address_string()} {fmt % args}", file=sys.stderr)

        def send(self, status, body: bytes, content_type: str):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status, obj):
            self.send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self):
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                return self.send(HTTPStatus.OK, INDEX.encode(), "text/html; charset=utf-8")
            m = RUN_FILES.match(path)
            if m and m.group(1) in server.runs:
                f = server.root / m.group(1) / m.group(2)
                if f.is_file():
                    kind = {"html": "text/html; charset=utf-8", "png": "image/png",
                            "json": "application/json"}[f.suffix[1:]]
                    return self.send(HTTPStatus.OK, f.read_bytes(), kind)
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self):
            url = urlsplit(self.path)
            try:
                if url.path != "/run":
                    raise BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path} (POST /run)")
                length = self.headers.get("Content-Length")
                if length is None:
                    raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length")
                if not length.isdigit():
                    raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length '{length}'")
                if int(length) > MAX_UPLOAD:
                    self.close_connection = True          # the body is not read
                    raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                     f"the upload is {int(length):,} bytes; at most {MAX_UPLOAD:,} are accepted")
                if int(length) == 0:
                    raise BadRequest(HTTPStatus.BAD_REQUEST, "no image: the request body is empty")
                body = self.rfile.read(int(length))
                if len(body) != int(length):
                    raise BadRequest(HTTPStatus.BAD_REQUEST, "the upload ended early")
                result = server.run(url.query, body)
                self.send_json(HTTPStatus.OK, result)
            except BadRequest as e:
                self.send_json(e.status, {"error": str(e)})
            except Exception as e:                  # a bug, not the request's fault: say so, keep serving
                traceback.print_exc()
                self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                               {"error": f"internal error ({type(e).__name__}: {e}); the server keeps running"})

    return Handler


def host_warning(host: str, port: int) -> str | None:
    """The warning a server bound beyond this machine prints (None for localhost)."""
    if host in LOCAL_HOSTS:
        return None
    return f"minivar: warning: serving on {host}: anyone who can reach port {port} can run the model"


def serve(args, build_parser, method_settings) -> int:
    """Load the model, serve until Ctrl-C or SIGTERM, remove the run folder. build_parser, method_settings: the
    command line's (cli.py), which a request's settings go through."""
    import minivar
    host, port = args.host or "127.0.0.1", PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise MinivarError(f"--port must be in 0..65535, got {port}")
    llava = minivar.load(args.model, device=args.device, dtype=args.dtype,
                         image_options={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels})
    defaults = {"model": args.model, "device": args.device, "dtype": args.dtype}
    root = Path(tempfile.mkdtemp(prefix="minivar-serve-"))
    try:
        try:
            httpd = ThreadingHTTPServer((host, port), handler(Server(llava, root, defaults, build_parser, method_settings)))
        except OSError as e:
            raise MinivarError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
        httpd.daemon_threads = True
        warning = host_warning(host, httpd.server_address[1])
        if warning:
            print(warning, file=sys.stderr)
        print(f"minivar: loaded {args.model} in {llava.load_s:.2f}s; serving on "
              f"http://{host if ':' not in host else f'[{host}]'}:{httpd.server_address[1]}/ (Ctrl-C stops; run "
              f"files in {root} (removed on exit)",
              file=sys.stderr, flush=True)

        def stop(signum, frame):
            raise Stop()
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            httpd.serve_forever()
        except (KeyboardInterrupt, Stop):
            print("minivar: stopped", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, previous)
            httpd.server_close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>minivar: live explorer</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #fafafa; }
form { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; padding: 10px 16px; background: #fff;
       border-bottom: 1px solid #ddd; }
fieldset { border: 1px solid #ddd; border-radius: 4px; padding: 2px 8px; }
input[type=number] { width: 5em; }
#question { width: 26em; }
#message { padding: 4px 16px; min-height: 1.4em; }
#message.error { color: #b00; }
iframe { width: 100%; height: calc(100vh - 140px); border: 0; }
</style></head><body>
<form id="form">
  <label>image <input type="file" id="image" accept="image/*" required></label>
  <label>question <input type="text" id="question" value="What is in the image?" required></label>
  <label>max new tokens <input type="number" name="max-new-tokens" value="32" min="1"></label>
  <fieldset><label><input type="checkbox" name="var"> VAR</label>
    <label>ρ <input type="number" name="rho" step="0.05" min="0" max="1" placeholder="0.8"></label>
    <label>τ <input type="number" name="tau" step="any" placeholder="20"></label>
    <label>p <input type="number" name="p" step="0.05" min="0" max="1" placeholder="0.6"></label>
    <label>floor <input type="number" name="min-image-attention" step="0.05" min="0" max="1" placeholder="0.2"></label>
    <label>rule <select name="var-rule"><option value="">paper</option>
      <option value="official">official</option></select></label></fieldset>
  <fieldset><label><input type="radio" name="contrast" value="" checked> no contrast</label>
    <label><input type="radio" name="contrast" value="damro"> DAMRO</label>
    <label><input type="radio" name="contrast" value="vcd"> VCD</label></fieldset>
  <button type="submit" id="run">run</button>
</form>
<div id="message"></div>
<iframe id="explorer" title="the run's explorer"></iframe>
<script>
"use strict";
const form = document.getElementById("form"), message = document.getElementById("message");
function say(text, error) { message.textContent = text; message.className = error ? "error" : ""; }
form.addEventListener("submit", async e => {
  e.preventDefault();
  const file = document.getElementById("image").files[0];
  if (!file) return say("choose an image first", true);
  const q = new URLSearchParams({ prompt: document.getElementById("question").value });
  for (const el of form.querySelectorAll("input[name], select[name]")) {
    if (el.type === "checkbox") { if (el.checked) q.set(el.name, ""); }
    else if (el.type === "radio") { if (el.checked && el.value) q.set(el.value, ""); }
    else if (el.value !== "") q.set(el.name, el.value);
  }
  say("running…"); document.getElementById("run").disabled = true;
  try {
    const r = await fetch("/run?" + q, { method: "POST", body: file });
    const out = await r.json();
    if (!r.ok) return say(`${r.status}: ${out.error}`, true);
    say(`answer: ${out.text}`);
    document.getElementById("explorer").src = out.explorer;
  } catch (err) { say(String(err), true); }
  finally { document.getElementById("run").disabled = false; }
});
</script></body></html>
"""
