// The two ends of bench/link-check.mts's streams, in processes of their own so that the proxy's
// CPU is measured alone:
//   link-load.mts serve                         a TCP and an HTTP server; prints {"tcp":P,"http":P}
//   link-load.mts load tcp|http down|up PORT STREAMS BYTES
//                                               STREAMS streams of BYTES each, all at once, through
//                                               PORT; prints {"bytes":N,"seconds":S,"single":[...]}
// TCP: the client sends one line, "down N" (the server sends N bytes and ends) or "up N" (the
// client sends N bytes, the server answers "ok" once it has them all). HTTP: GET /N answers N
// bytes; PUT takes the body and answers 200. Seconds are from the first payload byte received to
// the last one, by the receiving end (the server for "up": it answers with its times), so a
// profile's round trips are not counted as throughput.
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';

const BLOCK = Buffer.alloc(1024 * 1024, 0x5a);
/** Epoch ms, sub-ms precise and comparable between processes. */
const clock = () => performance.timeOrigin + performance.now();

/** Writes n bytes of BLOCK to w, with backpressure, then calls done. */
function pour(w: NodeJS.WritableStream, n: number, done: () => void) {
  let left = n;
  const more = () => {
    while (left > 0) {
      const piece = left >= BLOCK.length ? BLOCK : BLOCK.subarray(0, left);
      left -= piece.length;
      if (!w.write(piece)) return void w.once('drain', more);
    }
    done();
  };
  more();
}

const [mode, ...args] = process.argv.slice(2);

if (mode === 'serve') {
  const tcp = net.createServer({ allowHalfOpen: true }, (s) => {
    let line = '';
    let want = 0;
    let got = 0;
    let first = 0;
    const onData = (d: Buffer) => {
      if (want === 0 && !line.endsWith('\n')) {
        const text = d.toString('latin1');
        const nl = text.indexOf('\n');
        line += nl < 0 ? text : text.slice(0, nl + 1);
        if (nl < 0) return;
        const [dir, n] = line.trim().split(' ');
        want = Number(n);
        if (dir === 'down') return pour(s, want, () => s.end());
        d = d.subarray(nl + 1);
      }
      if (d.length) first ||= clock();
      got += d.length;
      if (got >= want) s.end(`${first} ${clock()}\n`);
    };
    s.on('data', onData);
    s.on('error', () => {});
  });
  const web = http.createServer((req, res) => {
    if (req.method === 'GET') {
      const n = Number(req.url!.slice(1));
      res.writeHead(200, { 'content-length': n });
      return pour(res, n, () => res.end());
    }
    let first = 0;
    req.on('data', () => (first ||= clock()));
    req.on('end', () => res.end(`${first} ${clock()}`));
  });
  await new Promise<void>((r) => tcp.listen(0, '127.0.0.1', r));
  await new Promise<void>((r) => web.listen(0, '127.0.0.1', r));
  const port = (s: net.Server | http.Server) => (s.address() as AddressInfo).port;
  process.stdout.write(JSON.stringify({ tcp: port(tcp), http: port(web) }) + '\n');
} else if (mode === 'load') {
  const [kind, dir, portText, streamsText, bytesText] = args;
  const port = Number(portText);
  const n = Number(bytesText);
  /** One stream: when its first and last payload bytes moved. */
  const one = (): Promise<{ first: number; last: number }> =>
    new Promise((resolve, reject) => {
      let first = 0;
      let answer = '';
      const mark = () => (first ||= clock());
      // For "up", the receiving server's times.
      const done = () => {
        if (dir === 'down') return resolve({ first, last: clock() });
        const [a, b] = answer.trim().split(' ').map(Number);
        resolve({ first: a, last: b });
      };
      if (kind === 'tcp') {
        const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
        s.on('error', reject);
        let got = 0;
        s.on('connect', () => {
          if (dir === 'down') return void s.write(`down ${n}\n`);
          s.write(`up ${n}\n`);
          pour(s, n, () => {});
        });
        s.on('data', (d: Buffer) => {
          if (dir === 'up') return void (answer += d);
          mark();
          got += d.length;
        });
        s.on('end', () => {
          s.end();
          if (dir === 'down' && got !== n) return reject(new Error(`got ${got} of ${n}`));
          done();
        });
      } else {
        const agent = new http.Agent({ keepAlive: false });
        const req = http.request(
          {
            host: '127.0.0.1',
            port,
            agent,
            method: dir === 'down' ? 'GET' : 'PUT',
            path: `/${n}`,
            headers: dir === 'up' ? { 'content-length': n } : {},
          },
          (res) => {
            let got = 0;
            res.on('data', (d: Buffer) => {
              if (dir === 'up') return void (answer += d);
              mark();
              got += d.length;
            });
            res.on('end', () => {
              if (dir === 'down' && got !== n) return reject(new Error(`got ${got} of ${n}`));
              done();
            });
          },
        );
        req.on('error', reject);
        if (dir === 'down') req.end();
        else pour(req, n, () => req.end());
      }
    });
  const streams = Number(streamsText);
  const runs = await Promise.all(Array.from({ length: streams }, one));
  const first = Math.min(...runs.map((r) => r.first));
  const last = Math.max(...runs.map((r) => r.last));
  process.stdout.write(
    JSON.stringify({
      bytes: n * streams,
      seconds: (last - first) / 1000,
      single: runs.map((r) => n / ((r.last - r.first) / 1000)),
    }) + '\n',
  );
  process.exit(0);
} else {
  console.error('usage: link-load.mts serve | load tcp|http down|up PORT STREAMS BYTES');
  process.exit(2);
}
