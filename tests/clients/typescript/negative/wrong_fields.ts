// Must NOT compile (tests/tools/test_typescript_client.py): misspelled fields
// against the generated types show that the type-check can fail.
import createClient from "openapi-fetch";
import type { paths } from "../generated/api";

export async function wrong(baseUrl: string): Promise<string> {
  const api = createClient<paths>({ baseUrl });
  const created = await api.POST("/api/v1/services", { body: { recipe: "inference/vllm" } });
  return created.data?.state ?? "";
}
