// A long network path between the tools under test and the S3 server, emulated on loopback: a
// `Link` (the path: its round trip, a rate per TCP connection and a cap on the sum, per direction)
// and what carries traffic over it: `WanProxy`, an HTTP proxy the tools use as their endpoint, and
// `TcpForward`, a raw TCP forward (ssh to "Verda", and the proxy's own check). What it models,
// exactly (RTT, rates and cap are the profile's):
// - every HTTP request costs one round trip: it is held RTT/2 before it is forwarded (the
//   request's way there) and its answer's status and headers RTT/2 before they are sent back;
// - a request with `Expect: 100-continue` (aws-cli's uploads) costs one round trip more: the
//   body is read only one RTT after the 100 Continue was sent (the 100's way back, the body's way
//   there);
// - a new HTTP connection costs `handshakeRtts` round trips (default 2: TCP's SYN/SYN-ACK and a
//   TLS 1.3 handshake, as to R2 over https) before its first request is forwarded;
// - a raw TCP connection costs one round trip (the SYN) before its first byte, and then every
//   byte takes RTT/2 each way (a delay line), so a protocol's own round trips (ssh's key exchange,
//   its channel window) cost what they would;
// - every TCP connection carries bytes at most `bytesPerSecond` in each direction (a token bucket
//   per connection and direction: one TCP flow on a long path is bound by its window), and all
//   the connections of a link together at most `capBytesPerSecond` per direction (a second bucket
//   every connection draws on: the NIC, the plan). A connection waits for its own bucket, then for
//   the shared one, so the cap is shared first come, first served.
// Not modelled: TCP slow start, loss, the server's own distance-independent latency. Loopback (RTT
// 0, no rate) goes through the same proxy, so requests are counted the same way for every tool on
// every profile. Request signing covers the Host header, which is forwarded unchanged.
//
// Cost: bytes are paced per socket read (up to 64 KiB), not in slices with a promise each: each
// read reserves its time in the buckets (arithmetic) and waits in a queue released by one timer
// at a time; a source is read up to LEAD_MS ahead of its pace, then paused until its pace catches
// up, so a connection at full rate costs a pause and a timer per LEAD_MS, not per slice. Measured
// (bench/link-check.mts): 16 HTTP streams at the EU cap (125 MB/s) cost this process 0.35 to 0.45
// of a core, the former 64 KiB slices with a promise each 20 to 40 % more.
import http from 'node:http';
import net, { type AddressInfo, type Socket } from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { requestKind, type Kind } from '../test/fault-proxy.ts';

export interface WanProfile {
  name: string;
  /** Round-trip time, ms. */
  rttMs: number;
  /** Per connection and direction; Infinity: no pacing. */
  bytesPerSecond: number;
  /** All the link's connections together, per direction; Infinity: no cap. */
  capBytesPerSecond: number;
  /** Round trips a new HTTP connection costs before its first request (TCP + TLS). */
  handshakeRtts?: number;
}

export const PROFILES: Record<string, WanProfile> = {
  loopback: { name: 'loopback', rttMs: 0, bytesPerSecond: Infinity, capBytesPerSecond: Infinity },
  // 1 Gbit/s in all: Mello (a VPS) to the EU buckets.
  eu: { name: 'EU', rttMs: 30, bytesPerSecond: 50e6, capBytesPerSecond: 125e6 },
  // Verda to the Oceania models bucket.
  far: { name: 'far', rttMs: 250, bytesPerSecond: 15e6, capBytesPerSecond: 60e6 },
  // Issue 13's profiles (no cap: N connections carry N times the rate), to compare with its results.
  'eu-nocap': { name: 'EU, no cap', rttMs: 30, bytesPerSecond: 50e6, capBytesPerSecond: Infinity },
  'far-nocap': { name: 'far, no cap', rttMs: 250, bytesPerSecond: 15e6, capBytesPerSecond: Infinity },
};
/** What `npm run bench` runs without --profile. */
export const DEFAULT_PROFILES = ['loopback', 'eu', 'far'];

export const capped = (p: WanProfile) => Number.isFinite(p.capBytesPerSecond);

export function describeProfile(p: WanProfile): string {
  if (p.rttMs === 0 && p.bytesPerSecond === Infinity) return `${p.name} (no delay, no pacing)`;
  const cap = capped(p) ? `, ${p.capBytesPerSecond / 1e6} MB/s in all` : ', no cap on the sum';
  return `${p.name} (${p.rttMs} ms RTT, ${p.bytesPerSecond / 1e6} MB/s per connection${cap}, each direction)`;
}

/** The fraction of the line a transfer used: bytes / (seconds × cap); undefined without a cap. */
export function lineFraction(bytes: number, seconds: number, p: WanProfile): number | undefined {
  return capped(p) && seconds > 0 ? bytes / (seconds * p.capBytesPerSecond) : undefined;
}

const now = () => performance.now();
const sleep = (ms: number): Promise<void> => (ms > 0 ? new Promise((r) => setTimeout(r, ms)) : Promise.resolve());

/** A source is read this far ahead of its pace (the queue holds it), then paused. Under ~4 ms, timers' lateness starves the link. */
const LEAD_MS = 20;

/**
 * A token bucket of `rate` bytes a second holding at most `burst`, kept as the time at which it is
 * full again (so taking is arithmetic, and a debt is a time in the future).
 */
export class Pace {
  private full = 0;
  private readonly burstMs: number;
  constructor(
    readonly rate: number,
    burst: number,
  ) {
    this.burstMs = (burst / rate) * 1000;
  }

  /** Takes n bytes that are ready at `at` (ms, performance.now()); returns when they may pass. */
  reserve(n: number, at: number): number {
    this.full = Math.max(this.full, at) + (n / this.rate) * 1000;
    return Math.max(at, this.full - this.burstMs);
  }
}

/** The path: a profile, and the buckets every connection over it shares (one per direction). */
export class Link {
  /** Towards the server (R2, or the TCP forward's target). */
  readonly up?: Pace;
  /** Towards the clients (the machines). */
  readonly down?: Pace;
  /** Bytes carried so far, per direction. */
  readonly bytes = { up: 0, down: 0 };

  constructor(readonly profile: WanProfile) {
    if (capped(profile)) {
      // A shared burst of 20 ms of the cap: what an idle NIC lets through at once.
      this.up = new Pace(profile.capBytesPerSecond, profile.capBytesPerSecond * 0.02);
      this.down = new Pace(profile.capBytesPerSecond, profile.capBytesPerSecond * 0.02);
    }
  }

  /** The buckets one new connection draws on, per direction: its own, then the link's. */
  connection(): { up: Pace[]; down: Pace[] } {
    const rate = this.profile.bytesPerSecond;
    // Burst: what one idle connection may send at once (20 ms of its rate, at least 64 KiB).
    const own = () => (Number.isFinite(rate) ? [new Pace(rate, Math.max(64 * 1024, rate * 0.02))] : []);
    return { up: [...own(), ...(this.up ? [this.up] : [])], down: [...own(), ...(this.down ? [this.down] : [])] };
  }
}

/**
 * Copies src to dst at the pace of `paces` (each in turn), each chunk delayed `oneWayMs` more (a
 * delay line; 0 for HTTP bodies, whose latency is modelled per request). `end`: dst is ended when
 * src ends. Bytes are counted as they are released.
 */
function pacedPipe(
  src: Readable,
  dst: Writable,
  paces: Pace[],
  oneWayMs: number,
  count: (n: number) => void,
  end = true,
): void {
  if (!paces.length && oneWayMs <= 0) {
    src.on('data', (d: Buffer) => count(d.length));
    src.pipe(dst, { end });
    return;
  }
  const queue: { chunk: Buffer; at: number }[] = [];
  let releaseTimer: NodeJS.Timeout | undefined;
  let resumeTimer: NodeJS.Timeout | undefined;
  let ahead = false; // paused: ahead of its pace
  let blocked = false; // paused: dst is full
  let ended = false;
  const maybeResume = () => {
    if (!ahead && !blocked && !ended) src.resume();
  };
  const release = () => {
    releaseTimer = undefined;
    const t = now();
    while (queue.length && queue[0].at <= t + 1) {
      const { chunk } = queue.shift()!;
      count(chunk.length);
      if (!dst.write(chunk) && !blocked) {
        blocked = true;
        src.pause();
        dst.once('drain', () => {
          blocked = false;
          maybeResume();
        });
      }
    }
    if (queue.length) releaseTimer = setTimeout(release, queue[0].at - t);
    else if (ended && end) dst.end();
  };
  src.on('data', (chunk: Buffer) => {
    const t = now();
    let at = t;
    for (const p of paces) at = p.reserve(chunk.length, at);
    queue.push({ chunk, at: at + oneWayMs });
    if (at > t + LEAD_MS) {
      ahead = true;
      src.pause();
      clearTimeout(resumeTimer);
      resumeTimer = setTimeout(
        () => {
          ahead = false;
          maybeResume();
        },
        at - t - LEAD_MS,
      );
    }
    if (!releaseTimer) release();
  });
  src.on('end', () => {
    ended = true;
    if (!queue.length && !releaseTimer && end) dst.end();
  });
  const stop = () => {
    clearTimeout(releaseTimer);
    clearTimeout(resumeTimer);
  };
  src.on('close', () => queue.length || stop());
  dst.on('close', stop);
}

/** One request as the proxy saw it. */
export interface Exchange {
  kind: Kind;
  method: string;
  /** The object key's path (bucket/key), without the query. */
  path: string;
  /** The Range header, if any. */
  range?: string;
  /** performance.now() at arrival, when its answer's headers were sent back, and when its last byte was (or it failed). */
  start: number;
  headers?: number;
  end?: number;
  status?: number;
  /** Which client connection carried it (1-based, in order of opening). */
  conn: number;
  /** Request body bytes forwarded. */
  bytesUp: number;
  /** Response body bytes sent back. */
  bytesDown: number;
}

const HOP_BY_HOP = ['connection', 'keep-alive', 'expect', 'proxy-connection', 'upgrade'];

interface Conn {
  id: number;
  paces: { up: Pace[]; down: Pace[] };
  /** The handshake is still owed by this connection's first request. */
  fresh: boolean;
}

export class WanProxy {
  readonly log: Exchange[] = [];
  private readonly conns = new WeakMap<Socket, Conn>();
  private readonly sockets = new Set<Socket>();
  // Connections to the server are unlimited: only the client's side of the proxy is "the path".
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

  private constructor(
    private readonly server: http.Server,
    private readonly upstream: URL,
    readonly link: Link,
  ) {}

  get profile(): WanProfile {
    return this.link.profile;
  }

  /** A proxy to `upstream` over `link` (a new link of its own when given a profile). */
  static async start(upstream: string, over: WanProfile | Link): Promise<WanProxy> {
    const link = over instanceof Link ? over : new Link(over);
    // Idle keep-alive connections are kept a minute, as a CDN front would, so that no client
    // races a close on reuse; no request timeout, a slow 100 MB part is legitimate here.
    const server = http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0, headersTimeout: 60_000 });
    const proxy = new WanProxy(server, new URL(upstream), link);
    server.on('connection', (s: Socket) => proxy.accept(s));
    server.on('request', (req, res) => void proxy.handle(req, res, false));
    server.on('checkContinue', (req, res) => void proxy.handle(req, res, true));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /** Connections the clients opened so far. */
  connections = 0;

  private accept(s: Socket) {
    this.conns.set(s, { id: ++this.connections, fresh: true, paces: this.link.connection() });
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse, expectContinue: boolean) {
    const { rttMs, handshakeRtts = 2 } = this.profile;
    const url = req.url ?? '/';
    const conn = this.conns.get(req.socket) ?? { id: 0, fresh: false, paces: { up: [], down: [] } };
    const range = req.headers.range;
    const ex: Exchange = {
      kind: requestKind(req.method ?? '', url),
      method: req.method ?? '',
      path: url.split('?')[0],
      ...(range ? { range } : {}),
      start: now(),
      conn: conn.id,
      bytesUp: 0,
      bytesDown: 0,
    };
    this.log.push(ex);
    let gone = false;
    res.on('close', () => {
      gone = !res.writableFinished;
      ex.end ??= now();
    });

    await sleep((conn.fresh ? handshakeRtts * rttMs : 0) + rttMs / 2);
    conn.fresh = false;
    if (expectContinue) {
      res.writeContinue();
      await sleep(rttMs);
    }
    if (gone) return;

    const headers = { ...req.headers };
    for (const h of HOP_BY_HOP) delete headers[h];
    const up = http.request({
      host: this.upstream.hostname,
      port: this.upstream.port,
      method: req.method,
      path: url,
      headers,
      agent: this.agent,
    });
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
    up.on('response', async (answer) => {
      await sleep(rttMs / 2);
      if (gone) return answer.destroy();
      ex.status = answer.statusCode;
      ex.headers = now();
      const h = { ...answer.headers };
      for (const name of HOP_BY_HOP) delete h[name];
      res.writeHead(answer.statusCode ?? 502, h);
      pacedPipe(answer, res, conn.paces.down, 0, (n) => {
        ex.bytesDown += n;
        this.link.bytes.down += n;
      });
    });
    up.on('error', () => {
      if (res.headersSent || gone) res.destroy();
      else res.writeHead(502).end();
    });
    req.on('error', () => up.destroy());
    pacedPipe(req, up, conn.paces.up, 0, (n) => {
      ex.bytesUp += n;
      this.link.bytes.up += n;
    });
  }

  async close() {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const s of this.sockets) s.destroy();
    });
    this.agent.destroy();
  }
}

/**
 * A raw TCP forward to `target` over a link: one RTT before the first byte, RTT/2 on every byte
 * each way, each connection paced and the link's cap shared. `clientToServer` names the link's
 * direction the client's bytes draw on: 'up' (as for HTTP, the client is a machine and the server
 * R2), or 'down' when the server is the machine the bytes go to (Mello's ssh to Verda: what Mello
 * sends Verda shares the way towards the machines with what R2 sends them).
 */
export class TcpForward {
  private readonly sockets = new Set<Socket>();
  connections = 0;

  private constructor(
    private readonly server: net.Server,
    readonly link: Link,
  ) {}

  static async start(
    target: { host: string; port: number },
    link: Link,
    clientToServer: 'up' | 'down' = 'up',
  ): Promise<TcpForward> {
    const server = net.createServer({ noDelay: true, pauseOnConnect: true, allowHalfOpen: true });
    const fwd = new TcpForward(server, link);
    server.on('connection', (client: Socket) => {
      fwd.connections++;
      fwd.track(client);
      const { rttMs } = link.profile;
      const paces = link.connection();
      const [toServer, toClient] = clientToServer === 'up' ? [paces.up, paces.down] : [paces.down, paces.up];
      const [countToServer, countToClient] =
        clientToServer === 'up'
          ? [(n: number) => (link.bytes.up += n), (n: number) => (link.bytes.down += n)]
          : [(n: number) => (link.bytes.down += n), (n: number) => (link.bytes.up += n)];
      // The SYN's round trip, then the server is reached.
      setTimeout(() => {
        if (client.destroyed) return;
        const upstream = net.connect({ ...target, noDelay: true, allowHalfOpen: true });
        fwd.track(upstream);
        upstream.on('error', () => client.destroy());
        client.on('error', () => upstream.destroy());
        // Each side is ended when the other's bytes are through (half-closes pass); one that goes
        // takes the other with it once what is still on the way (the delay line) has arrived.
        const after = (s: Socket) => () => setTimeout(() => s.destroy(), rttMs + 100).unref();
        upstream.on('close', after(client));
        client.on('close', after(upstream));
        upstream.once('connect', () => {
          pacedPipe(client, upstream, toServer, rttMs / 2, countToServer);
          pacedPipe(upstream, client, toClient, rttMs / 2, countToClient);
          client.resume();
        });
      }, rttMs);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return fwd;
  }

  private track(s: Socket) {
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  async close() {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const s of this.sockets) s.destroy();
    });
  }
}

/** Requests in log[from..] by kind, e.g. { put: 2000, list: 2 }. */
export function countKinds(log: Exchange[]): Partial<Record<Kind, number>> {
  const counts: Partial<Record<Kind, number>> = {};
  for (const e of log) counts[e.kind] = (counts[e.kind] ?? 0) + 1;
  return counts;
}

/**
 * Listing round trips one after the other: the longest chain of list requests each sent after
 * the one before it was answered. Paging 2,000 keys in turn is 2; 20 prefixes listed at once, 1.
 */
export function listingDepth(log: Exchange[]): number {
  const lists = log.filter((e) => e.kind === 'list').sort((a, b) => a.start - b.start);
  const depth: number[] = [];
  let best = 0;
  for (let i = 0; i < lists.length; i++) {
    let d = 1;
    for (let j = 0; j < i; j++) if ((lists[j].end ?? Infinity) <= lists[i].start) d = Math.max(d, depth[j] + 1);
    depth.push(d);
    best = Math.max(best, d);
  }
  return best;
}
