import { useState } from "preact/hooks";
import { auth } from "../api";
import { Card, useAuth } from "../ui";

export function Login() {
  const a = useAuth();
  const [token, setToken] = useState("");
  const [err, setErr] = useState<string | null>(null);
  const submit = (e: Event) => {
    e.preventDefault();
    const before = auth.identity ? auth.tenant : null;
    const msg = auth.login(token);
    setErr(msg);
    if (msg) return;
    location.hash = "#/";
    // Another tenant than the previous identity's: start over, so nothing read in that one stays cached.
    if (before !== null && before !== auth.tenant) location.reload();
  };
  return (
    <div class="login">
      <Card title="Sign in">
        {a.required && <div class="banner warn" data-testid="login-required">This Fabrica asks who you are: paste your access token.
          {auth.refused && <> The last one was refused: {auth.refused}</>}</div>}
        <form onSubmit={submit} class="form">
          <label class={`field wide ${err ? "invalid" : ""}`}>
            <span class="field-label">Access token</span>
            <textarea name="token" rows={5} value={token} onInput={(e) => setToken(e.currentTarget.value)}
              placeholder="eyJhbGciOi…" spellcheck={false} autocomplete="off" />
            {err ? <span class="field-error" role="alert">{err}</span>
              : <span class="field-hint">A bearer token (JWT) with your roles. It is kept in this browser tab only.</span>}
          </label>
          <div class="form-actions">
            <button class="btn primary" type="submit">Sign in</button>
            {a.identity && <button class="btn ghost" type="button" onClick={() => auth.logout()}>Sign out {a.identity.sub}</button>}
          </div>
        </form>
      </Card>
    </div>
  );
}
