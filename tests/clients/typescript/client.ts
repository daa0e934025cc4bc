// A service's life through a client typed from openapi/openapi.json: the
// generated `paths` (openapi-typescript) checked at every call by openapi-fetch.
// It is type-checked (tests/tools/test_typescript_client.py), not run: a field,
// path or status the document does not have fails the compile.
import createClient from "openapi-fetch";
import type { components, paths } from "./generated/api";

type Schemas = components["schemas"];
type Status = Schemas["ServiceStatus"];

// Every status the document lists, exhaustively: a new one fails the compile.
export function isEnded(status: Status): boolean {
  switch (status) {
    case "pending":
    case "building":
    case "starting":
    case "running":
      return false;
    case "completed":
    case "failed":
    case "cancelled":
    case "timeout":
      return true;
    default: {
      const unknown: never = status;
      return unknown;
    }
  }
}

function problem(error: Schemas["ProblemResponse"]): Error {
  const fields = (error.errors ?? []).map((e) => `${e.field}: ${e.message}`);
  return new Error(`${error.status} ${error.title}: ${error.detail} ${fields.join("; ")}`);
}

// /v1 answers errors in OpenAI's shape, not problem+json.
function openaiError(error: Schemas["OpenAIError"]): Error {
  const { type, message, param, code } = error.error;
  return new Error(`${type} ${code ?? "-"} (${param ?? "-"}): ${message}`);
}

export async function walk(baseUrl: string): Promise<string[]> {
  const api = createClient<paths>({ baseUrl });
  const seen: string[] = [];

  const created = await api.POST("/api/v1/services", {
    body: {
      recipe_name: "testing/openai-stub",
      config: { environment: { STUB_TOKENS: "4" }, resources: { cpu: "1", time_limit: 5 } },
    },
  });
  if (created.error) throw problem(created.error);
  const service: Schemas["ServiceResponse"] = created.data;
  const id = service.id;
  const byId = { params: { path: { service_id: id } } };

  try {
    let status: Schemas["ServiceStatusResponse"];
    const deadline = Date.now() + 90_000;
    for (;;) {
      const polled = await api.GET("/api/v1/services/{service_id}/status", byId);
      if (polled.error) throw problem(polled.error);
      status = polled.data;
      if (status.status === "running" || isEnded(status.status) || Date.now() > deadline) break;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    const endpoint: string | null = status.endpoint;
    seen.push(`status ${status.status} at ${endpoint ?? "-"}`);

    const answered = await api.POST("/api/v1/vllm/{service_id}/prompt", {
      ...byId,
      body: { prompt: "hi", max_tokens: 4, temperature: 0, stop: null },
    });
    if (answered.error) throw problem(answered.error);
    // 200 is JSON, or Server-Sent Events with stream: true.
    const answer = answered.data;
    if ("response" in answer) {
      const usage: Schemas["UsageResponse"] = answer.usage;
      seen.push(`prompt ${answer.response} (${usage.completion_tokens} tokens, ${answer.finish_reason ?? "-"})`);
    }

    const logs = await api.GET("/api/v1/services/{service_id}/logs", {
      params: { path: { service_id: id }, query: { tail: 50 } },
    });
    if (logs.error) throw problem(logs.error);
    // 200 is JSON, or Server-Sent Events with follow: true.
    const read = logs.data;
    if ("stdout" in read) {
      const reason: string | null = read.reason;
      seen.push(`logs ${read.stdout.length} bytes, truncated ${read.truncated}, ${reason ?? "read"}`);
    }

    // The OpenAI front door routes by model: the stub's, then an unknown one.
    const models = await api.GET("/v1/models");
    if (models.error) throw openaiError(models.error);
    const card: Schemas["OpenAIModel"] | undefined = models.data.data.find((m) => m.id === "stub");
    const unknown = await api.GET("/v1/models/{model}", { params: { path: { model: "no/such-model" } } });
    if (unknown.data !== undefined) throw new Error(`no/such-model is served: ${unknown.data.id}`);
    const notFound: string | null | undefined = unknown.error.error.code;
    const chat = await api.POST("/v1/chat/completions", {
      body: { model: "stub", messages: [{ role: "user", content: "hi" }], max_tokens: 4 },
    });
    if (chat.error) throw openaiError(chat.error);
    seen.push(`openai ${models.data.data.length} models, stub ${card?.max_model_len ?? "-"}, ${notFound ?? "-"}`);
  } finally {
    const stopped = await api.DELETE("/api/v1/services/{service_id}", byId);
    if (stopped.error) throw problem(stopped.error);
    const final: Status = stopped.data.status;
    seen.push(`stop ${final}: ${stopped.data.message}`);
  }

  // The document gives this operation no error answer: no `error` to test.
  const recipes = await api.GET("/api/v1/recipes");
  if (recipes.data === undefined) throw new Error(`recipes: HTTP ${recipes.response.status}`);
  const vllm: Schemas["RecipeResponse"] | undefined = recipes.data.find((r) => r.path === "inference/vllm");
  const one = await api.GET("/api/v1/recipes/{recipe_name}", {
    params: { path: { recipe_name: "inference/vllm" } },
  });
  if (one.error) throw problem(one.error);
  const model: string | undefined = one.data.environment["VLLM_MODEL"];
  seen.push(`recipes ${recipes.data.length}, inference/vllm ${vllm?.kind ?? "missing"} ${model ?? ""}`);
  return seen;
}
