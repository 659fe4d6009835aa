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

/**
 * At most `limit` callers inside `run` at once; the others wait their turn: lowest `priority`
 * first, then in order of arrival.
 */
export class Slots {
  protected busy = 0;
  protected readonly waiting: { priority: number; go: () => void }[] = [];
  constructor(public limit: number) {}

  async run<T>(fn: () => Promise<T>, priority = 0): Promise<T> {
    while (this.busy >= this.limit) {
      await new Promise<void>((go) => {
        // Sorted on the way in: after every waiter of the same or a lower priority.
        let at = this.waiting.length;
        while (at > 0 && this.waiting[at - 1].priority > priority) at--;
        this.waiting.splice(at, 0, { priority, go });
      });
    }
    this.busy++;
    try {
      return await fn();
    } finally {
      this.busy--;
      this.wake();
    }
  }

  protected wake() {
    for (let free = this.limit - this.busy; free > 0 && this.waiting.length; free--) this.waiting.shift()!.go();
  }
}

/**
 * Slots that size themselves to the link: while callers wait and throughput grows with more in
 * flight, the limit grows by half (up to `max`, the memory budget); when growing gains nothing it
 * steps back; on congestion (R2's 429 or 503) it halves. One TCP connection over a long thin path
 * carries tens of MB/s: filling it takes many requests at once, which on loopback would only add
 * contention.
 */
export class AdaptiveSlots extends Slots {
  private units = 0;
  private best = 0;
  private grownFrom?: number;
  private cooldown = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(
    readonly min: number,
    start: number,
    readonly max: number,
    windowMs = 1000,
  ) {
    super(start);
    this.timer = setInterval(() => this.adjust(), windowMs);
    this.timer.unref();
  }

  /** Work finished (bytes, or a unit per small request): the throughput the limit is judged by. */
  done(units: number) {
    this.units += units;
  }

  /** The server asked to slow down. */
  congested() {
    this.limit = Math.max(this.min, Math.floor(this.limit / 2));
    this.best = 0;
    this.grownFrom = undefined;
    this.cooldown = 3;
  }

  private adjust() {
    const rate = this.units;
    this.units = 0;
    if (this.cooldown > 0) {
      this.cooldown--;
      return;
    }
    if (rate > this.best * 1.1) {
      this.best = rate;
      // Still more waiting than running: more in flight may carry more.
      if (this.waiting.length && this.limit < this.max) {
        this.grownFrom = this.limit;
        this.limit = Math.min(this.max, Math.ceil(this.limit * 1.5));
        this.cooldown = 1; // the window after a change is half old, half new: judged by the next
        this.wake();
      }
    } else if (this.grownFrom !== undefined) {
      // Growing gained nothing: back to where it was, and stay a while.
      this.limit = this.grownFrom;
      this.grownFrom = undefined;
      this.cooldown = 5;
    }
  }

  stop() {
    clearInterval(this.timer);
  }
}
