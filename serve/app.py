"""The Serve application: the model replicas plus a FastAPI ingress for steering examples.

    serve run serve/config.yaml        # declarative (import path icm_ray_serve.app:build)
    icm-ray serve --results RUN ...    # the same app from the CLI

Glue only: example selection lives in icm_ray.steering, scoring in the model deployment,
searches in icm_ray.engine. Set ICM_RAY_API_KEY to require `Authorization: Bearer <key>`
on every endpoint except /healthz.
"""


import hmac
import math
import os
import threading
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from icm_ray.backends.base import ScoreRequest
from icm_ray.data import Dataset, Example, dataset_from_rows
from icm_ray.errors import UserError, user_error_in
from icm_ray.prompts import PromptConfig, query_text
from icm_ray.results import package_version
from icm_ray.steering import PersonaEntry, generation_block, load_run, prompt_block, select

API_KEY_ENV = "ICM_RAY_API_KEY"
MAX_K = 64
MAX_STATEMENTS = 64
MAX_TEXT = 4000
MAX_BODY_BYTES = 1_000_000
MAX_CONCURRENT_SEARCHES = 2
MAX_SEARCH_EXAMPLES = 256
MAX_STOP = 200
MAX_SEED = 2**32 - 1

api = FastAPI(title="icm-ray steering API", version=package_version(),
              description="Persona-specific steering examples inferred by ICM, without human labels.")


@api.middleware("http")
async def guard(request: Request, call_next):
    """API key (when configured) and a cap on body size, before any handler runs."""
    key = os.environ.get(API_KEY_ENV)
    path = request.url.path[len(request.scope.get("root_path", "")):]  # under any route prefix
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if key and path != "/healthz" and not (scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), key.encode())):
        return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer ...)"},
                            status_code=401)
    too_large = JSONResponse({"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
    length = request.headers.get("content-length")
    if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return too_large
    if length is None and request.method in ("POST", "PUT", "PATCH"):  # chunked: count what arrives
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return too_large
            chunks.append(chunk)
        request._body = b"".join(chunks)  # Starlette's cached body: the handler reads it from here
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without echoing the input: a non-finite number (1e400, NaN) in it would
    make the error itself unserialisable (a 500)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Item(Strict):
    """What gets labelled, in the data files' own fields: a claim (optionally with its question),
    a comparison (prompt, response_a, response_b) or an open-ended response (prompt, response)."""

    claim: str | None = Field(None, max_length=MAX_TEXT)
    question: str | None = Field(None, max_length=MAX_TEXT)
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    response_a: str | None = Field(None, max_length=MAX_TEXT)
    response_b: str | None = Field(None, max_length=MAX_TEXT)
    response: str | None = Field(None, max_length=MAX_TEXT)


class ClassifyRequest(Strict):
    statements: list[str] | None = Field(None, min_length=1, max_length=MAX_STATEMENTS)
    examples: list[Item] | None = Field(None, min_length=1, max_length=MAX_STATEMENTS,
                                        description="instead of statements: claims, comparisons or "
                                        "responses in the data files' fields")
    k: int = Field(8, ge=0, le=MAX_K, strict=True, description="steering examples used as demonstrations")


class CompletionRequest(BaseModel):
    """OpenAI-compatible; `persona` (or model "persona:<name>") prepends steering examples."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1, le=256, strict=True)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=20, strict=True)  # 20 as vLLM: label scoring reads top-k
    n: int = Field(1, ge=1, le=1, strict=True)
    stream: Literal[False] = False
    stop: (Annotated[str, Field(max_length=MAX_STOP)]
           | Annotated[list[Annotated[str, Field(max_length=MAX_STOP)]], Field(max_length=4)]  # as OpenAI
           | None) = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    persona: str | None = Field(None, max_length=200)
    k: int = Field(8, ge=0, le=MAX_K, strict=True)


class SearchExample(Item):
    id: str = Field(min_length=1, max_length=200)
    group: str | int | None = Field(None, description="consistency group (see Data formats)")
    key: str | int | None = Field(None, description="consistency key inside the group")


class SearchRequest(Strict):
    persona: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
                         description="the name it is served under: letters, digits, space . _ -")
    description: str | None = Field(None, max_length=1000)
    examples: list[SearchExample] | None = Field(None, min_length=1, max_length=MAX_SEARCH_EXAMPLES)
    data_path: str | None = Field(None, max_length=1000, description="a dataset path on the server")
    iterations: int = Field(16, ge=0, le=512, strict=True)
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True)


async def _model_call(response):
    """Await a call to the model replicas; an error caused by the input (a prompt longer than
    the model's context) is a 422 naming it, not a 500."""
    try:
        return await response
    except Exception as err:
        if user_error_in(err):
            raise HTTPException(422, detail=str(user_error_in(err))) from None
        raise


def _exactly_one(body: BaseModel, first: str, second: str) -> None:
    if (getattr(body, first) is None) == (getattr(body, second) is None):
        raise HTTPException(422, detail=[{"loc": ["body"], "msg": f"give exactly one of '{first}' or "
                                          f"'{second}'"}])


def _examples(items: list[Item], field: str, persona: str) -> Dataset:
    """Items of a body, checked by the data files' own rules (a 422 names the item and field)."""
    rows = [{"id": str(index), **item.model_dump(exclude_none=True)} for index, item in enumerate(items)]
    try:
        return dataset_from_rows(rows, field, persona)
    except UserError as err:
        raise HTTPException(422, detail=[{"loc": ["body", field], "msg": str(err)}]) from None


def _text_fields(statements: list[str]) -> None:
    for index, text in enumerate(statements):
        if not text.strip() or len(text) > MAX_TEXT:
            raise HTTPException(422, detail=[{"loc": ["body", "statements", index],
                                              "msg": f"must be 1 to {MAX_TEXT} characters"}])


@serve.deployment(name="SteeringAPI", max_ongoing_requests=64)
@serve.ingress(api)
class SteeringAPI:
    def __init__(self, model, results: list[str], searches_dir: str | None = None,
                 search_config: dict | None = None):
        self.model = model
        self.personas: dict[str, PersonaEntry] = {}
        for uri in results:
            self.personas.update(load_run(uri))
        self.searches: dict[str, dict[str, Any]] = {}
        self.searches_dir = searches_dir or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "icm-ray", "searches")
        self.search_config = search_config or {}
        self.lock = threading.Lock()

    def _persona(self, name: str) -> PersonaEntry:
        entry = self.personas.get(name)
        if entry is None:
            raise HTTPException(404, detail=f"unknown persona '{name}'; see GET /v1/personas")
        return entry

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "personas": len(self.personas)}

    @api.get("/v1/personas")
    def personas(self) -> dict:
        rows = []
        for entry in self.personas.values():
            s = entry.summary
            rows.append({"persona": entry.name, "labelled": s["labelled"], "utility": s["utility"],
                         "inconsistencies": s["inconsistencies"], "run": entry.run,
                         "accuracy_vs_gold": s.get("accuracy_vs_gold")})
        return {"personas": rows}

    @api.get("/v1/personas/{persona}/examples")
    def examples(self, persona: str, k: int = Query(8, ge=1, le=MAX_K),
                 query: str | None = Query(None, max_length=MAX_TEXT), balance: bool = False) -> dict:
        entry = self._persona(persona)
        chosen = select(entry.examples, k, query, balance)
        out = {"persona": persona, "examples": [
            {"id": e.id, "text": e.text, "label": e.label, "confidence": e.confidence} for e in chosen],
            "prompt": prompt_block(entry.header, chosen)}
        if entry.generates:  # open-ended responses: endorsed ones, ready to steer generation
            out["generation_prompt"] = generation_block(entry, k, query)
        return out

    @api.post("/v1/personas/{persona}/classify")
    async def classify(self, persona: str, body: ClassifyRequest) -> dict:
        entry = self._persona(persona)
        _exactly_one(body, "statements", "examples")
        if body.statements is not None:
            _text_fields(body.statements)
            items = [Example(str(i), persona, "claim", claim=s) for i, s in enumerate(body.statements)]
        else:  # the ids (`<index>`, from 0) are never shown
            items = _examples(body.examples, "examples", persona).examples
        prompts = entry.prompts or PromptConfig()
        chosen = select(entry.examples, body.k, balance=True)
        prefix = (entry.header, "".join(e.demonstration for e in chosen))
        requests = [ScoreRequest(prefix, query_text(prompts, item), prompts.options) for item in items]
        results = await _model_call(self.model.score.remote(requests))
        out = []
        for index, result in enumerate(results):
            p_true = math.exp(result.logprobs[0])
            shown = ({"statement": body.statements[index]} if body.statements is not None
                     else {"example": body.examples[index].model_dump(exclude_none=True)})
            out.append({**shown, "label": p_true >= 0.5, "probability": p_true})
        return {"persona": persona, "demonstrations": len(chosen), "results": out}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> dict:
        persona = body.persona
        if persona is None and body.model and body.model.startswith("persona:"):
            persona = body.model.split(":", 1)[1]
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not isinstance(p, str) or len(p) > 4 * MAX_TEXT for p in prompts) \
                or len(prompts) > 8:
            raise HTTPException(422, detail=[{"loc": ["body", "prompt"],
                                              "msg": "1 to 8 prompts of at most 16000 characters"}])
        prefix = ""
        if persona is not None:
            entry = self._persona(persona)
            if entry.generates:  # endorsed responses, nearest to the prompt, as examples to follow
                prefix = generation_block(entry, body.k, " ".join(prompts))
            else:
                prefix = prompt_block(entry.header, select(entry.examples, body.k, balance=True))
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for index, prompt in enumerate(prompts):
            result = await _model_call(self.model.generate.remote(
                prefix + prompt, body.max_tokens, body.temperature, body.logprobs, body.seed))
            text, finish = result["text"], result["finish_reason"]
            stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
            for stop in stops:
                if stop and stop in text:
                    text, finish = text[:text.index(stop)], "stop"
            choices.append({"index": index, "text": text, "finish_reason": finish,
                            "logprobs": result.get("logprobs")})
            usage["prompt_tokens"] += result["prompt_tokens"]
            usage["completion_tokens"] += result["completion_tokens"]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": body.model or "icm-ray",
                "choices": choices, "usage": usage}

    # ------------------------------------------------------------ searches

    @api.post("/v1/searches", status_code=202)
    def start_search(self, body: SearchRequest) -> dict:
        from icm_ray.config import RunConfig
        from icm_ray.data import Persona, default_description, load_datasets
        from icm_ray.engine import plan_jobs, save_inputs

        _exactly_one(body, "examples", "data_path")
        self._name_is_free(body.persona)
        if body.examples is not None:
            dataset = _examples(body.examples, "examples", body.persona)
        else:
            try:
                dataset = load_datasets([body.data_path])
                dataset = dataset.select_personas([body.persona])
            except UserError as err:
                raise HTTPException(422, detail=[{"loc": ["body", "data_path"], "msg": str(err)}]) from None
        try:
            config = RunConfig.model_validate({**self.search_config, "search": {
                **self.search_config.get("search", {}), "iterations": body.iterations, "seed": body.seed}})
        except ValueError as err:
            raise HTTPException(422, detail=[{"loc": ["body"], "msg": str(err).splitlines()[0]}]) from None
        with self.lock:
            self._name_is_free(body.persona)  # again: another request may have taken it meanwhile
            running = sum(1 for s in self.searches.values() if s["status"] == "running")
            if running >= MAX_CONCURRENT_SEARCHES:
                raise HTTPException(429, detail=f"{running} searches already running; try later")
            search_id = f"search-{uuid.uuid4().hex[:12]}"
            record = {"id": search_id, "persona": body.persona, "status": "running",
                      "progress": {"iteration": 0, "total": body.iterations}, "error": None}
            self.searches[search_id] = record
        persona = Persona(body.persona, body.description or default_description(body.persona))
        from icm_ray.store import RunStore

        try:
            store = RunStore(os.path.join(self.searches_dir, search_id))
            save_inputs(store, config, dataset, {body.persona: persona})
            jobs = plan_jobs(dataset, {body.persona: persona})
        except Exception as err:  # the slot is given back; the record says why
            record["status"], record["error"] = "failed", f"{type(err).__name__}: {err}".splitlines()[0]
            raise HTTPException(500, detail=f"could not start the search: {record['error']}") from None
        threading.Thread(target=self._run_search, args=(record, jobs, config, store, dataset),
                         daemon=True).start()
        return {"id": search_id, "status": "running"}

    def _name_is_free(self, persona: str) -> None:
        """A served persona, or one a running search will publish, would be replaced silently."""
        if persona in self.personas or any(s["persona"] == persona and s["status"] == "running"
                                           for s in self.searches.values()):
            raise HTTPException(409, detail=f"persona '{persona}' is already served or being "
                                "searched; give this search another name")

    def _run_search(self, record, jobs, config, store, dataset) -> None:
        from icm_ray.engine import run_on_ray
        from icm_ray.results import write_run

        def progress(_name: str, info: dict) -> None:
            record["progress"] = info

        try:
            finished, identity = run_on_ray(jobs, config, store, progress, handle=self.model)
            write_run(store, finished, dataset.gold, config.model_dump(mode="json"), identity,
                      config.prompts)
            self.personas.update(load_run(store.uri))
            record["summary"] = store.read_json("summary.json")["personas"][0]
            record["status"] = "finished"
        except Exception as err:  # reported through GET /v1/searches/{id}
            from icm_ray.engine import checkpoint_name

            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            try:
                if not any(store.exists(checkpoint_name(job.persona.name)) for job in jobs):
                    store.clear()  # nothing to resume: no half-written run left behind
            except Exception:  # the failure above is what the record reports
                pass

    @api.get("/v1/searches/{search_id}")
    def search_status(self, search_id: str) -> dict:
        record = self.searches.get(search_id)
        if record is None:
            raise HTTPException(404, detail=f"unknown search '{search_id}'")
        return record


def build_app(results: list[str], model: dict | None = None, ray: dict | None = None,
              searches_dir: str | None = None, api_key: str | None = None):
    """The whole application: model replicas plus the API ingress that calls them."""
    from icm_ray.config import RunConfig
    from icm_ray.replicas import model_app

    config = RunConfig.model_validate({"model": model or {}, "ray": ray or {}})
    replicas = model_app(config)
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    options = {"runtime_env": {"env_vars": {API_KEY_ENV: key}}} if key else {}
    return SteeringAPI.options(ray_actor_options={"num_cpus": 0.1, **options}).bind(
        replicas, list(results), searches_dir, {"model": config.model.model_dump(mode="json")})


def build(args: dict[str, Any]):
    """Application builder for `serve run serve/config.yaml` (args from the YAML)."""
    return build_app(args.get("results", []), args.get("model"), args.get("ray"),
                     args.get("searches_dir"))
