// A programmable HTTP proxy on loopback in front of the S3 server: the scripts under test use it
// as R2_ENDPOINT, and the test decides what the network and the server do to each request. It
// can answer requests of a kind with a 5xx (an S3 XML error, the request never forwarded), cut
// the client's connection after N bytes of a request body, slow request bodies down, hold a
// request without ever answering it, and stop reading a request body midway; cut or slow an
// answer's body (a download) midway; and it
// logs every exchange with its outcome, so a test can count what passed.
// Request signing covers the Host header, which is forwarded unchanged.
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { Transform } from 'node:stream';

export type Kind =
  | 'list'
  | 'head'
  | 'get'
  | 'put'
  | 'upload-part'
  | 'create-multipart'
  | 'complete-multipart'
  | 'abort-multipart'
  | 'delete'
  /** A server-side copy: CopyObject, or UploadPartCopy (a PUT with x-amz-copy-source). */
  | 'copy'
  | 'other';

export interface Exchange {
  /** 1-based, in order of arrival. */
  n: number;
  kind: Kind;
  method: string;
  url: string;
  /** The object key (decoded), without the bucket. */
  key: string;
  bucket: string;
  uploadId?: string;
  partNumber?: number;
  /** Date.now() when the request arrived. */
  at: number;
  /** The status the client got, if it got one. */
  status?: number;
  /** Request body bytes passed on to the server. */
  bodyBytes: number;
  /** Answer body bytes passed on to the client. */
  answerBytes: number;
  /** The Range header of a GET, if any (`bytes=8388608-16777215`). */
  range?: string;
  /** forwarded: answered by the server; injected: answered by the proxy with an error; cut: the
   * connection was cut by the proxy; client-gone: the client went away before the answer; held:
   * accepted and never answered; stalled: its body stopped being read midway. */
  outcome: 'pending' | 'forwarded' | 'injected' | 'cut' | 'client-gone' | 'upstream-error' | 'held' | 'stalled';
}

export function requestKind(method: string, url: string, copySource = false): Kind {
  const q = new URL(url, 'http://x').searchParams;
  const hasKey = new URL(url, 'http://x').pathname.split('/').filter(Boolean).length > 1;
  if (method === 'PUT' && copySource) return 'copy';
  if (method === 'PUT') return q.has('uploadId') && q.has('partNumber') ? 'upload-part' : 'put';
  if (method === 'POST')
    return q.has('uploads') ? 'create-multipart' : q.has('uploadId') ? 'complete-multipart' : 'other';
  if (method === 'DELETE') return q.has('uploadId') ? 'abort-multipart' : 'delete';
  if (method === 'HEAD') return 'head';
  if (method === 'GET') return hasKey ? 'get' : 'list';
  return 'other';
}

const ERRORS: Record<number, [code: string, message: string]> = {
  500: ['InternalError', 'We encountered an internal error. Please try again.'],
  502: ['BadGateway', 'Bad gateway.'],
  503: ['SlowDown', 'Please reduce your request rate.'],
  504: ['GatewayTimeout', 'Gateway timeout.'],
};

interface Rule {
  kinds: Kind[];
  /** Matching requests let through untouched before this rule applies. */
  skip: number;
  /** Matching requests this rule still applies to. */
  remaining: number;
}

const HOP_BY_HOP = ['connection', 'keep-alive', 'expect', 'proxy-connection', 'upgrade'];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class FaultProxy {
  readonly log: Exchange[] = [];
  private fails: (Rule & { status: number })[] = [];
  private cuts: (Rule & { afterBytes: number })[] = [];
  private losses: Rule[] = [];
  private holds: (Rule & { readBody: boolean })[] = [];
  private stalls: (Rule & { afterBytes: number })[] = [];
  private throttles = new Map<Kind, number>();
  private answerCuts: (Rule & { afterBytes: number })[] = [];
  private answerThrottles = new Map<Kind, number>();
  private watchers: (() => void)[] = [];
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  private readonly sockets = new Set<Socket>();

  private constructor(
    private readonly server: http.Server,
    private readonly upstream: URL,
    readonly port: number,
  ) {}

  static async start(upstream: string): Promise<FaultProxy> {
    const server = http.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const proxy = new FaultProxy(server, new URL(upstream), (server.address() as AddressInfo).port);
    server.on('request', (req, res) => proxy.handle(req, res));
    server.on('connection', (s: Socket) => {
      proxy.sockets.add(s);
      s.on('close', () => proxy.sockets.delete(s));
    });
    return proxy;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The next `count` requests of these kinds (after `skip` let through) get `status` and an S3 error body. */
  fail(kinds: Kind[], count: number, status = 503, skip = 0) {
    this.fails.push({ kinds, remaining: count, status, skip });
  }

  /**
   * The next matching request whose body is longer than `afterBytes` (after `skip` such let
   * through) has its connection cut once `afterBytes` of its body passed.
   */
  cut(kinds: Kind[], afterBytes: number, skip = 0, count = 1) {
    this.cuts.push({ kinds, afterBytes, skip, remaining: count });
  }

  /**
   * The next `count` matching requests reach the server and are carried out, but their answer
   * is lost: the connection is cut once the server has answered.
   */
  loseAnswer(kinds: Kind[], count = 1) {
    this.losses.push({ kinds, skip: 0, remaining: count });
  }

  /**
   * The next `count` matching requests (after `skip` let through) are accepted and never
   * answered, nor forwarded: their body is read to its end (`readBody`), or never read at all, so
   * the client's bytes pile up in the socket buffers.
   */
  hold(kinds: Kind[], count: number, skip = 0, { readBody = true } = {}) {
    this.holds.push({ kinds, remaining: count, skip, readBody });
  }

  /**
   * The next `count` matching requests whose body is longer than `afterBytes` (after `skip` such
   * let through) have `afterBytes` of their body passed on, and then it is no longer read: a
   * server that stops reading mid-upload.
   */
  stall(kinds: Kind[], afterBytes: number, skip = 0, count = 1) {
    this.stalls.push({ kinds, afterBytes, skip, remaining: count });
  }

  /** Request bodies of these kinds pass at `bytesPerSecond` each at most; undefined lifts it, for those in flight too. */
  throttle(kinds: Kind[], bytesPerSecond: number | undefined) {
    for (const k of kinds) {
      if (bytesPerSecond === undefined) this.throttles.delete(k);
      else this.throttles.set(k, bytesPerSecond);
    }
    this.notify();
  }

  /**
   * The next `count` matching answers whose body is longer than `afterBytes` (after `skip` such
   * let through) have their connection cut once `afterBytes` of the body reached the client: a
   * download cut midway.
   */
  cutAnswer(kinds: Kind[], afterBytes: number, skip = 0, count = 1) {
    this.answerCuts.push({ kinds, afterBytes, skip, remaining: count });
  }

  /** Answer bodies of these kinds pass at `bytesPerSecond` each at most; undefined lifts it, for those in flight too. */
  throttleAnswers(kinds: Kind[], bytesPerSecond: number | undefined) {
    for (const k of kinds) {
      if (bytesPerSecond === undefined) this.answerThrottles.delete(k);
      else this.answerThrottles.set(k, bytesPerSecond);
    }
    this.notify();
  }

  /** Removes every fault; what is in flight goes on at full speed. */
  clearFaults() {
    this.answerCuts = [];
    this.answerThrottles.clear();
    this.fails = [];
    this.cuts = [];
    this.losses = [];
    this.holds = [];
    this.stalls = [];
    this.throttles.clear();
    this.notify();
  }

  /** Matching fault rules not yet used up (a test asserts its faults were all met). */
  pendingFaults(): number {
    const rules = [...this.fails, ...this.cuts, ...this.losses, ...this.holds, ...this.stalls, ...this.answerCuts];
    return rules.filter((r) => r.remaining > 0 && Number.isFinite(r.remaining)).length;
  }

  of(kind: Kind, from = 0): Exchange[] {
    return this.log.slice(from).filter((e) => e.kind === kind);
  }

  /** Resolves once `check` holds (tried on every request and every piece of body that passes). */
  waitFor(check: () => boolean, timeoutMs: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.watchers = this.watchers.filter((w) => w !== watch);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      const watch = () => {
        if (!check()) return;
        clearTimeout(timer);
        this.watchers = this.watchers.filter((w) => w !== watch);
        resolve();
      };
      this.watchers.push(watch);
      watch();
    });
  }

  private notify() {
    for (const w of [...this.watchers]) w();
  }

  private take<R extends Rule>(rules: R[], kind: Kind, fits: (r: R) => boolean = () => true): R | undefined {
    const rule = rules.find((r) => r.remaining > 0 && r.kinds.includes(kind) && fits(r));
    if (!rule) return undefined;
    if (rule.skip > 0) {
      rule.skip--;
      return undefined;
    }
    rule.remaining--;
    return rule;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse) {
    const url = req.url ?? '/';
    const parsed = new URL(url, 'http://x');
    const [bucket = '', ...keyParts] = parsed.pathname.split('/').slice(1).map(decodeURIComponent);
    const part = parsed.searchParams.get('partNumber');
    const ex: Exchange = {
      n: this.log.length + 1,
      kind: requestKind(req.method ?? '', url, 'x-amz-copy-source' in req.headers),
      method: req.method ?? '',
      url,
      bucket,
      key: keyParts.join('/'),
      uploadId: parsed.searchParams.get('uploadId') ?? undefined,
      partNumber: part ? Number(part) : undefined,
      at: Date.now(),
      bodyBytes: 0,
      answerBytes: 0,
      range: typeof req.headers.range === 'string' ? req.headers.range : undefined,
      outcome: 'pending',
    };
    this.log.push(ex);
    let clientGone = false;
    res.on('close', () => {
      if (res.writableFinished) return;
      clientGone = true;
      if (ex.outcome === 'pending') ex.outcome = 'client-gone';
      this.notify();
    });
    this.notify();

    const fail = this.take(this.fails, ex.kind);
    if (fail) {
      // Read the body (as a server that refuses a request does) and answer with the error.
      req.resume();
      req.on('end', () => {
        if (clientGone) return;
        const [code, message] = ERRORS[fail.status] ?? ['InternalError', 'Injected fault.'];
        const body = `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>${message}</Message><RequestId>fault-${ex.n}</RequestId></Error>`;
        ex.status = fail.status;
        ex.outcome = 'injected';
        res.writeHead(fail.status, {
          'content-type': 'application/xml',
          'content-length': ex.method === 'HEAD' ? 0 : Buffer.byteLength(body),
        });
        res.end(ex.method === 'HEAD' ? undefined : body);
        this.notify();
      });
      return;
    }

    const hold = this.take(this.holds, ex.kind);
    if (hold) {
      ex.outcome = 'held';
      if (hold.readBody) {
        req.on('data', (chunk: Buffer) => {
          ex.bodyBytes += chunk.length;
          this.notify();
        });
      }
      this.notify();
      return;
    }

    const length = Number(req.headers['content-length'] ?? 0);
    const cut = this.take(this.cuts, ex.kind, (r) => length > r.afterBytes);
    const stall = cut ? undefined : this.take(this.stalls, ex.kind, (r) => length > r.afterBytes);
    const lose = this.take(this.losses, ex.kind);

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
    up.on('response', (answer) => {
      ex.status = answer.statusCode;
      if (lose) {
        // Carried out upstream; the answer never reaches the client.
        answer.resume();
        answer.on('end', () => {
          ex.outcome = 'cut';
          req.socket.destroy();
          this.notify();
        });
        return;
      }
      const h = { ...answer.headers };
      for (const name of HOP_BY_HOP) delete h[name];
      res.writeHead(answer.statusCode ?? 502, h);
      const answerLength = Number(answer.headers['content-length'] ?? 0);
      const answerCut = this.take(this.answerCuts, ex.kind, (r) => answerLength > r.afterBytes);
      const proxy = this;
      const paced = new Transform({
        async transform(chunk: Buffer, _enc, cb) {
          for (let at = 0; at < chunk.length;) {
            const rate = proxy.answerThrottles.get(ex.kind);
            let n = rate ? Math.min(chunk.length - at, 16 * 1024) : chunk.length - at;
            if (answerCut) n = Math.min(n, answerCut.afterBytes - ex.answerBytes);
            this.push(chunk.subarray(at, at + n));
            at += n;
            ex.answerBytes += n;
            proxy.notify();
            if (answerCut && ex.answerBytes >= answerCut.afterBytes) {
              // The bytes so far reach the client; then the line goes dead.
              ex.outcome = 'cut';
              setTimeout(() => {
                req.socket.destroy();
                answer.destroy();
                proxy.notify();
              }, 20);
              return;
            }
            if (rate) await sleep((n / rate) * 1000);
          }
          cb();
        },
      });
      answer.pipe(paced).pipe(res);
      answer.on('end', () => {
        if (ex.outcome === 'pending') ex.outcome = 'forwarded';
        this.notify();
      });
    });
    up.on('error', () => {
      if (ex.outcome !== 'pending') return;
      ex.outcome = 'upstream-error';
      if (!res.headersSent && !clientGone) {
        ex.status = 502;
        res.writeHead(502).end();
      } else res.destroy();
    });

    const proxy = this;
    let dead = false;
    const meter = new Transform({
      async transform(chunk: Buffer, _enc, cb) {
        try {
          for (let at = 0; at < chunk.length && !dead;) {
            const rate = proxy.throttles.get(ex.kind);
            let n = rate ? Math.min(chunk.length - at, 64 * 1024) : chunk.length - at;
            if (cut) n = Math.min(n, cut.afterBytes - ex.bodyBytes);
            if (stall) n = Math.min(n, stall.afterBytes - ex.bodyBytes);
            this.push(chunk.subarray(at, at + n));
            at += n;
            ex.bodyBytes += n;
            proxy.notify();
            if (cut && ex.bodyBytes >= cut.afterBytes) {
              // The bytes so far reach the server; then the line goes dead both ways.
              dead = true;
              ex.outcome = 'cut';
              setTimeout(() => {
                req.socket.destroy();
                up.destroy();
                proxy.notify();
              }, 20);
              break;
            }
            if (stall && ex.bodyBytes >= stall.afterBytes) {
              // Never calling back: nothing more is read from the client, whose sends then stop.
              ex.outcome = 'stalled';
              proxy.notify();
              return;
            }
            if (rate) await sleep((n / rate) * 1000);
          }
          cb();
        } catch (e) {
          cb(e as Error);
        }
      },
    });
    req.on('error', () => up.destroy());
    req.pipe(meter).pipe(up);
  }

  async close() {
    this.server.close();
    for (const s of this.sockets) s.destroy();
    this.agent.destroy();
  }
}
