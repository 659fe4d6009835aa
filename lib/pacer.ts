// Retries and concurrency, for any backend: bounded attempts with exponential backoff and jitter,
// a sleep that an abort ends, and slots that bound how much is in flight at once. Nothing here
// knows about S3: a backend says which failures are worth another attempt.

/** A sleep that ends early, rejecting with the signal's reason, when the signal aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** What to do after a failed attempt: wait and try again, try again at once, or give up. */
export type Verdict = 'backoff' | 'now' | 'fail';

export interface PacerOptions {
  /** Attempts per request, the first included. */
  attempts: number;
  /** The first retry's delay; doubled per attempt, ±25% so that many retries do not march in step. */
  backoffMs: number;
}

export class Pacer {
  /** Attempts made, by operation: the tests read it. */
  readonly attempts: Record<string, number> = {};
  constructor(readonly opts: PacerOptions) {}

  /** The wait before retry number `retry` (1 for the first retry). */
  delay(retry: number): number {
    return this.opts.backoffMs * 2 ** (retry - 1) * (0.75 + Math.random() / 2);
  }

  /**
   * Runs `attempt` until it succeeds, `judge` says to give up, or the attempts are spent; then
   * throws what `giveUp` makes of the last error. A `now` verdict does not count as an attempt
   * (a request refused for the clock, signed again with the corrected one).
   */
  async run<T>(
    op: string,
    signal: AbortSignal | undefined,
    attempt: (n: number) => Promise<T>,
    judge: (e: unknown, n: number) => Verdict,
    giveUp: (e: unknown, n: number) => unknown,
  ): Promise<T> {
    for (let n = 1; ; n++) {
      this.attempts[op] = (this.attempts[op] ?? 0) + 1;
      try {
        return await attempt(n);
      } catch (e) {
        if (signal?.aborted) throw signal.reason;
        const verdict = judge(e, n);
        if (verdict === 'now') {
          n--;
          continue;
        }
        if (verdict === 'fail' || n >= this.opts.attempts) throw giveUp(e, n);
        await sleep(this.delay(n), signal);
      }
    }
  }
}

/** At most `size` callers inside `run` at once; the others wait their turn, in order. */
export class Slots {
  private busy = 0;
  private readonly waiting: (() => void)[] = [];
  constructor(readonly size: number) {}

  async run<T>(fn: () => Promise<T>): Promise<T> {
    while (this.busy >= this.size) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.busy++;
    try {
      return await fn();
    } finally {
      this.busy--;
      this.waiting.shift()?.();
    }
  }
}
