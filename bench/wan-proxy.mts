// A long network path between the tools under test and the S3 server, emulated on loopback: an
// HTTP proxy that the tools use as their endpoint. What it models, exactly (RTT and rate are
// the profile's):
// - every request costs one round trip: it is held RTT/2 before it is forwarded (the request's
//   way there) and its answer's status and headers RTT/2 before they are sent back (the way back);
// - a request with `Expect: 100-continue` (aws-cli's uploads) costs one round trip more: the
//   body is read only one RTT after the 100 Continue was sent (the 100's way back, the body's way
//   there);
// - a new TCP connection costs `handshakeRtts` round trips (default 2: TCP's SYN/SYN-ACK and a
//   TLS 1.3 handshake, as to R2 over https) before its first request is forwarded;
// - every TCP connection carries bodies at most `bytesPerSecond` in each direction (a token
//   bucket per connection and direction, so N connections carry N times the rate, as on a
//   long path where one TCP flow is bound by its window, not by the link).
// Not modelled: TCP slow start, loss, a shared bottleneck, the server's own distance-independent
// latency. Loopback (RTT 0, no rate) goes through the same proxy, so requests are counted the
// same way for every tool on every profile. Request signing covers the Host header, which is
// forwarded unchanged.
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { Transform } from 'node:stream';
import { requestKind, type Kind } from '../test/fault-proxy.ts';

export interface WanProfile {
  name: string;
  /** Round-trip time, ms. */
  rttMs: number;
  /** Per connection and direction; Infinity: no pacing. */
  bytesPerSecond: number;
  /** Round trips a new connection costs before its first request (TCP + TLS). */
  handshakeRtts?: number;
}

export const PROFILES: Record<string, WanProfile> = {
  loopback: { name: 'loopback', rttMs: 0, bytesPerSecond: Infinity },
  eu: { name: 'EU', rttMs: 30, bytesPerSecond: 50e6 },
  far: { name: 'far', rttMs: 250, bytesPerSecond: 15e6 },
};

export function describeProfile(p: WanProfile): string {
  if (p.rttMs === 0 && p.bytesPerSecond === Infinity) return `${p.name} (no delay, no pacing)`;
  return `${p.name} (${p.rttMs} ms RTT, ${p.bytesPerSecond / 1e6} MB/s per connection and direction)`;
}

/** One request as the proxy saw it. */
export interface Exchange {
  kind: Kind;
  method: string;
  /** performance.now() at arrival and when the answer's last byte was sent (or it failed). */
  start: number;
  end?: number;
  status?: number;
  /** Request body bytes forwarded. */
  bytesUp: number;
  /** Response body bytes sent back. */
  bytesDown: number;
}

const HOP_BY_HOP = ['connection', 'keep-alive', 'expect', 'proxy-connection', 'upgrade'];
const sleep = (ms: number): Promise<void> => (ms > 0 ? new Promise((r) => setTimeout(r, ms)) : Promise.resolve());

/** A token bucket: `rate` bytes a second, at most `burst` saved up while idle. */
class Bucket {
  private tokens: number;
  private last = performance.now();
  constructor(
    private readonly rate: number,
    private readonly burst: number,
  ) {
    this.tokens = burst;
  }

  /** Takes n bytes' worth; resolves once they may pass (running into debt, so a sleep's overshoot evens out). */
  take(n: number): Promise<void> {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
    this.tokens -= n;
    return this.tokens < 0 ? sleep((-this.tokens / this.rate) * 1000) : Promise.resolve();
  }
}

/** A stream that passes bytes at the bucket's pace, in slices small enough to keep the pace smooth. */
function paced(bucket: Bucket, count: (n: number) => void): Transform {
  return new Transform({
    async transform(chunk: Buffer, _enc, cb) {
      try {
        for (let at = 0; at < chunk.length; at += 64 * 1024) {
          const piece = chunk.subarray(at, at + 64 * 1024);
          await bucket.take(piece.length);
          count(piece.length);
          this.push(piece);
        }
        cb();
      } catch (e) {
        cb(e as Error);
      }
    },
  });
}

interface Conn {
  up?: Bucket;
  down?: Bucket;
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
    readonly profile: WanProfile,
  ) {}

  static async start(upstream: string, profile: WanProfile): Promise<WanProxy> {
    // Idle keep-alive connections are kept a minute, as a CDN front would, so that no client
    // races a close on reuse; no request timeout, a slow 100 MB part is legitimate here.
    const server = http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0, headersTimeout: 60_000 });
    const proxy = new WanProxy(server, new URL(upstream), profile);
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
    const { bytesPerSecond: rate } = this.profile;
    // Burst: what one idle connection may send at once (20 ms of its rate, at least 64 KiB).
    const burst = Math.max(64 * 1024, rate * 0.02);
    this.conns.set(s, {
      fresh: true,
      ...(Number.isFinite(rate) ? { up: new Bucket(rate, burst), down: new Bucket(rate, burst) } : {}),
    });
    this.connections++;
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse, expectContinue: boolean) {
    const { rttMs, handshakeRtts = 2 } = this.profile;
    const url = req.url ?? '/';
    const ex: Exchange = {
      kind: requestKind(req.method ?? '', url),
      method: req.method ?? '',
      start: performance.now(),
      bytesUp: 0,
      bytesDown: 0,
    };
    this.log.push(ex);
    const conn = this.conns.get(req.socket) ?? { fresh: false };
    let gone = false;
    res.on('close', () => {
      gone = !res.writableFinished;
      ex.end ??= performance.now();
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
      const h = { ...answer.headers };
      for (const name of HOP_BY_HOP) delete h[name];
      res.writeHead(answer.statusCode ?? 502, h);
      const count = (n: number) => (ex.bytesDown += n);
      if (conn.down) answer.pipe(paced(conn.down, count)).pipe(res);
      else answer.on('data', (d: Buffer) => count(d.length)).pipe(res);
    });
    up.on('error', () => {
      if (res.headersSent || gone) res.destroy();
      else res.writeHead(502).end();
    });
    req.on('error', () => up.destroy());
    const count = (n: number) => (ex.bytesUp += n);
    if (conn.up) req.pipe(paced(conn.up, count)).pipe(up);
    else req.on('data', (d: Buffer) => count(d.length)).pipe(up);
  }

  async close() {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const s of this.sockets) s.destroy();
    });
    this.agent.destroy();
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
