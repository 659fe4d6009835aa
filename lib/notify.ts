// Pings to a dead man's switch in healthchecks.io's convention (Uptime Kuma push monitors, ntfy
// and the self-hosted peers take it too): `GET URL/start` once a run holds its lock, `POST URL`
// with the summary when it succeeded, `POST URL/fail` with the summary when it failed. A ping
// never changes the exit code. Every request has a timeout and a bounded retry, and the end of
// a run waits for its pings at most twice COMFYMULTI_NOTIFY_TIMEOUT. The URL is the check's key:
// messages name its variable and host, never the URL itself.
import os from 'node:os';
import { UsageError, errorText, printable } from './cli.ts';
import { Pacer } from './pacer.ts';

export const NOTIFY_VARIABLES = ['NOTIFY_URL', 'NOTIFY_URL_VERDA', 'NOTIFY_URL_MELLO', 'NOTIFY_URL_CRON'] as const;

/** The variable that overrides NOTIFY_URL for a script. */
const SCRIPT_VARIABLE: Record<string, (typeof NOTIFY_VARIABLES)[number]> = {
  'backup-verda': 'NOTIFY_URL_VERDA',
  'restore-verda': 'NOTIFY_URL_VERDA',
  'backup-mello': 'NOTIFY_URL_MELLO',
  'restore-mello': 'NOTIFY_URL_MELLO',
  'backup-cron': 'NOTIFY_URL_CRON',
};

/** healthchecks.io keeps the first 10,000 bytes of a ping's body (its PING_BODY_LIMIT default). */
export const BODY_LIMIT = 10_000;
const ATTEMPTS = 3;
const BACKOFF_MS = 250;

/** A ping URL: http(s), one token, no credentials (fetch refuses them) and no fragment. */
export function checkNotifyUrl(name: string, value: string): URL {
  // The value is not repeated in a message: it is the key that lets anyone ping the check.
  if (/[\s\x00-\x1f\x7f]/.test(value)) throw new UsageError(`${name} holds whitespace or a control character`);
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new UsageError(`${name} is not a URL (expected http(s)://host/path, e.g. https://hc-ping.com/<uuid>)`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new UsageError(`${name} must be an http(s) URL (got "${url.protocol}")`);
  }
  if (url.username || url.password) throw new UsageError(`${name} must not hold a user name or password`);
  if (url.hash) throw new UsageError(`${name} must not hold a #fragment`);
  return url;
}

export interface NotifyTarget {
  /** The variable it came from, for messages. */
  variable: string;
  url: URL;
}

/** Where a script's pings go: its own variable (NOTIFY_URL_MELLO for backup-mello), else NOTIFY_URL, else nowhere. */
export function notifyTarget(env: Record<string, string | undefined>, script: string): NotifyTarget | undefined {
  const own = SCRIPT_VARIABLE[script];
  const variable = own && env[own] ? own : env.NOTIFY_URL ? 'NOTIFY_URL' : undefined;
  return variable ? { variable, url: checkNotifyUrl(variable, env[variable]!) } : undefined;
}

export type PingKind = 'start' | 'success' | 'fail';

/** The URL of a ping: `/start` or `/fail` appended to the path; a query (`?create=1`) is kept. */
export function pingUrl(base: URL, kind: PingKind): URL {
  const url = new URL(base.href);
  if (kind !== 'success') url.pathname = `${url.pathname.replace(/\/+$/, '')}/${kind}`;
  return url;
}

/** A ping's body: `lines` joined, each made printable, cut to BODY_LIMIT bytes on a character boundary. */
export function pingBody(lines: string[]): string {
  const text = lines.map(printable).join('\n') + '\n';
  const bytes = Buffer.from(text);
  if (bytes.length <= BODY_LIMIT) return text;
  const cut = '\n… (cut at 10,000 bytes)\n';
  // toString drops a character split at the cut (it becomes U+FFFD, removed here).
  return (
    bytes
      .subarray(0, BODY_LIMIT - Buffer.byteLength(cut))
      .toString('utf8')
      .replace(/\uFFFD$/, '') + cut
  );
}

/** A ping the server answered with a status that is not a success. */
class PingRefused extends Error {
  constructor(readonly status: number) {
    super(`HTTP ${status}`);
  }
}

/** One script run's pings. */

/** 0.999 s (a limit cut by the run's deadline) reads as 1 s: tenths at most. */
const seconds = (ms: number) => String(Math.round(ms / 100) / 10);
export class Notifier {
  private startPing?: Promise<string | undefined>;
  private readonly startAbort = new AbortController();

  constructor(
    readonly target: NotifyTarget,
    /** One request's timeout (COMFYMULTI_NOTIFY_TIMEOUT). */
    private readonly timeoutMs: number,
    /**
     * A run that backs nothing up (a restore, a drill) pings its failure only: a success or a
     * start from it would tell the backup's check that backups are being made.
     */
    private readonly failuresOnly = false,
  ) {}

  /** `GET URL/start`, in the background: the run does not wait for it. */
  start(): void {
    if (this.failuresOnly) return;
    this.startPing = this.send('start', undefined, Date.now() + 2 * this.timeoutMs, this.startAbort.signal);
  }

  /**
   * Waits for the start ping at most one timeout (then abandons it, so that it cannot arrive after
   * the end ping) and says what went wrong with it, if anything.
   */
  async settleStart(): Promise<string | undefined> {
    if (!this.startPing) return undefined;
    let timer: NodeJS.Timeout | undefined;
    const gaveUp = new Promise<string>((resolve) => {
      timer = setTimeout(() => {
        this.startAbort.abort();
        resolve(this.problem('start', `no answer within ${seconds(this.timeoutMs)} s`));
      }, this.timeoutMs);
    });
    try {
      return await Promise.race([this.startPing, gaveUp]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** `POST URL` (ok) or `POST URL/fail` with the summary; at most one timeout, retries included. */
  async end(ok: boolean, body: string): Promise<string | undefined> {
    if (ok && this.failuresOnly) return undefined;
    return this.send(ok ? 'success' : 'fail', body, Date.now() + this.timeoutMs);
  }

  private problem(kind: PingKind, why: string): string {
    const what = kind === 'success' ? 'success ping' : `/${kind} ping`;
    return `notification not sent: ${what} to ${this.target.variable} (${this.target.url.host}): ${why}`;
  }

  /** Sends one ping, again after a network error, a timeout, a 429 or a 5xx, until `deadline`. */
  private async send(
    kind: PingKind,
    body: string | undefined,
    deadline: number,
    outer?: AbortSignal,
  ): Promise<string | undefined> {
    const url = pingUrl(this.target.url, kind);
    const pacer = new Pacer({ attempts: ATTEMPTS, backoffMs: BACKOFF_MS });
    let last = 'no time left';
    try {
      await pacer.run(
        'ping',
        outer,
        async () => {
          const left = deadline - Date.now();
          if (left <= 0) throw new Error('no time left');
          const limitMs = Math.min(this.timeoutMs, left);
          const timeout = AbortSignal.timeout(limitMs);
          try {
            const res = await fetch(url, {
              method: body === undefined ? 'GET' : 'POST',
              body,
              headers: body === undefined ? undefined : { 'content-type': 'text/plain; charset=utf-8' },
              signal: outer ? AbortSignal.any([outer, timeout]) : timeout,
            });
            // The answer's body ("OK") is not needed; not reading it frees the connection.
            void res.body?.cancel().catch(() => {});
            if (!res.ok) throw new PingRefused(res.status);
          } catch (e) {
            last = timeout.aborted ? `no answer within ${seconds(limitMs)} s` : errorText(e);
            throw e;
          }
        },
        // Another 4xx says the URL is wrong: asking again will not help. Nor is there time past the deadline.
        (e) =>
          (e instanceof PingRefused && e.status < 500 && e.status !== 429) || Date.now() >= deadline
            ? 'fail'
            : 'backoff',
        (e) => e,
      );
      return undefined;
    } catch {
      return this.problem(kind, last);
    }
  }
}

/**
 * A run that stopped before it started (a configuration error, an unwritable state directory):
 * `POST URL/fail` saying why, when the URL could be read. Resolves with what went wrong, if anything.
 */
export async function pingNotStarted(
  target: NotifyTarget,
  timeoutMs: number,
  script: string,
  why: string,
): Promise<string | undefined> {
  const body = pingBody([`${script} on ${os.hostname()}: not started, nothing was done`, `✗ ${why}`]);
  return new Notifier(target, timeoutMs).end(false, body);
}
