// NOTIFY_URL (issue 11): the real scripts, run as the admin runs them, ping a loopback HTTP server
// that records every request; the backups go to a real S3 server (s3rver).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import { UsageError } from '../lib/cli.ts';
import { BODY_LIMIT, checkNotifyUrl, pingBody, pingUrl } from '../lib/notify.ts';
import {
  closedPort,
  runScript,
  SECRET,
  sha256,
  startS3,
  tempDir,
  writeHeldLock,
  writeTree,
  type S3Server,
  out,
} from './helpers.ts';
import { ENV_SECRET, makeVerda } from './verda-fixture.ts';

const USER_FILES = 'comfy-multi-user-files';
const CACHE = 'comfy-multi-cache';
const MODELS = 'comfy-multi-model-vault-backup';
/** Short limits: a refused R2 request fails in a second, a ping gives up after one. */
const FAST = {
  COMFYMULTI_R2_TIMEOUT: '3',
  COMFYMULTI_R2_BACKOFF: '0.05',
  COMFYMULTI_COMMAND_TIMEOUT: '3',
  COMFYMULTI_NOTIFY_TIMEOUT: '1',
};
const KNOWN_SECRET = 'sk_notify_test_secret_31337';

let s3: S3Server;
let work: string;

interface Ping {
  method: string;
  path: string;
  body: string;
}

interface PingServer {
  url: string;
  pings: Ping[];
  close(): void;
}

/** A loopback HTTP server recording each request; `hang`: it reads the request and never answers. */
async function pingServer(mode: 'answer' | 'hang' = 'answer'): Promise<PingServer> {
  const pings: Ping[] = [];
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (body += d));
    req.on('end', () => {
      pings.push({ method: req.method ?? '', path: req.url ?? '', body });
      if (mode === 'answer') res.end('OK');
    });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    pings,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

const run = (script: string, args: string[], env: Record<string, string>, limitMs = 90_000) =>
  runScript(script, args, env, { limitMs });

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const brief = (pings: Ping[]) => pings.map((p) => `${p.method} ${p.path}`);

/** A Mello data tree and state dir of its own, and the environment to back it up to s3rver. */
function mello(name: string, extra: Record<string, string> = {}) {
  const root = path.join(work, name);
  const data = path.join(root, 'data');
  writeTree(data, {
    'user_data/user001/flow.json': '{"nodes":[]}',
    'inputs/a.png': 'png bytes',
    'outputs/user001/o.png': 'output',
  });
  const state = path.join(root, 'state');
  const env: Record<string, string> = {
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: state,
    MELLO_DATA_DIR: data,
    ...FAST,
    ...extra,
  };
  return { root, data, state, env };
}

test.before(async () => {
  s3 = await startS3([USER_FILES, CACHE, MODELS]);
  work = tempDir('notify');
});

test.after(async () => {
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// The pieces

test('ping URLs: /start and /fail go after the path, a trailing slash and a query are kept right', () => {
  const base = checkNotifyUrl('NOTIFY_URL', 'https://hc-ping.com/abc-123');
  assert.is(pingUrl(base, 'start').href, 'https://hc-ping.com/abc-123/start');
  assert.is(pingUrl(base, 'fail').href, 'https://hc-ping.com/abc-123/fail');
  assert.is(pingUrl(base, 'success').href, 'https://hc-ping.com/abc-123');
  const slug = checkNotifyUrl('NOTIFY_URL', 'https://hc.example/ping/key/backup-mello/?create=1');
  assert.is(pingUrl(slug, 'fail').href, 'https://hc.example/ping/key/backup-mello/fail?create=1');
  for (const [value, said] of [
    ['ftp://hc.example/x', /must be an http\(s\) URL/],
    ['https://hc.example/a b', /whitespace/],
    ['hc-ping.com/abc', /is not a URL/],
    ['https://user:pw@hc.example/x', /user name or password/],
    ['https://hc.example/x#frag', /fragment/],
  ] as const) {
    assert.throws(
      () => checkNotifyUrl('NOTIFY_URL_CRON', value),
      (e: Error) =>
        e instanceof UsageError &&
        said.test(e.message) &&
        e.message.includes('NOTIFY_URL_CRON') &&
        !e.message.includes('pw@'),
    );
  }
});

test('a ping body is cut at 10,000 bytes, never inside a character', () => {
  const body = pingBody(Array.from({ length: 2000 }, (_, i) => `line ${i}: ünï 日本 ✓`));
  assert.ok(Buffer.byteLength(body) <= BODY_LIMIT, `${Buffer.byteLength(body)} bytes`);
  assert.ok(body.endsWith('… (cut at 10,000 bytes)\n'));
  assert.not.ok(body.includes('\uFFFD'), 'no broken character');
  assert.is(pingBody(['short', 'body']), 'short\nbody\n');
});

// ---------------------------------------------------------------------------------------------
// Runs

test('a good run sends GET /start, then POST with the summary (steps named, no credential in it)', async () => {
  const server = await pingServer();
  try {
    const m = mello('good', { NOTIFY_URL: `${server.url}/ping/abc-123` });
    const r = await run('backup-mello.mts', [], m.env);
    assert.is(r.code, 0, out(r));
    assert.equal(brief(server.pings), ['GET /ping/abc-123/start', 'POST /ping/abc-123'], out(r));
    const body = server.pings[1].body;
    assert.match(body, /^backup-mello on .+ \(full\): Backup complete in [\d.]+s: 3 ok, 0 skipped, 0 failed$/m, body);
    assert.match(body, /^Step 1 \(User data \(workflows, settings\)\): ✓ /m, body);
    assert.match(body, /^Step 2 \(Outputs\): ✓ /m, body);
    assert.match(body, /^sent \S+ in all$/m, body);
    assert.not.match(body, /S3RVER/, 'the key id and secret (both S3RVER) are not in the body');
    assert.is(server.pings[0].body, '', 'the start ping has no body');
    assert.is(sha256(await s3.readObject(USER_FILES, 'user_data/user001/flow.json')), sha256('{"nodes":[]}'));
  } finally {
    server.close();
  }
});

test('a run with a failing step sends start, then POST /fail naming the step; the secret is not in it', async () => {
  const server = await pingServer();
  try {
    const refused = `http://127.0.0.1:${await closedPort()}`;
    const m = mello('failing', {
      NOTIFY_URL: `${server.url}/ping/f`,
      R2_ENDPOINT: refused,
      R2_SECRET_ACCESS_KEY: KNOWN_SECRET,
      COMFYMULTI_R2_ATTEMPTS: '1',
    });
    const r = await run('backup-mello.mts', ['--quick'], m.env);
    assert.is(r.code, 1, out(r));
    assert.equal(brief(server.pings), ['GET /ping/f/start', 'POST /ping/f/fail'], out(r));
    const body = server.pings[1].body;
    assert.match(body, /\(quick\): Backup FAILED in /, body);
    assert.match(body, /^✗ Step 1 \(User data \(workflows, settings\)\): /m, body);
    assert.match(body, /^Step 2 \(Outputs\): – skipped \(--quick\)$/m, body);
    assert.not.ok(body.includes(KNOWN_SECRET), 'no secret in the body');
    assert.not.ok((r.stdout + r.stderr).includes(KNOWN_SECRET), 'nor in the output');
  } finally {
    server.close();
  }
});

test('NOTIFY_URL_MELLO wins over NOTIFY_URL for backup-mello; NOTIFY_URL_VERDA and _CRON are not its', async () => {
  const server = await pingServer();
  try {
    const own = mello('own', { NOTIFY_URL: `${server.url}/general`, NOTIFY_URL_MELLO: `${server.url}/mello` });
    const r = await run('backup-mello.mts', ['--quick'], own.env);
    assert.is(r.code, 0, out(r));
    assert.equal(brief(server.pings), ['GET /mello/start', 'POST /mello'], out(r));
    server.pings.length = 0;
    const others = mello('others', {
      NOTIFY_URL: `${server.url}/general`,
      NOTIFY_URL_VERDA: `${server.url}/verda`,
      NOTIFY_URL_CRON: `${server.url}/cron`,
    });
    const r2 = await run('backup-mello.mts', ['--quick'], others.env);
    assert.is(r2.code, 0, out(r2));
    assert.equal(brief(server.pings), ['GET /general/start', 'POST /general'], out(r2));
  } finally {
    server.close();
  }
});

test('an unreachable or silent notify URL changes neither exit code nor backup, holds the run ~2 s', async () => {
  const silent = await pingServer('hang');
  try {
    const m = mello('unreachable');
    const sendsNew = async (label: string, extra: Record<string, string>, args: string[] = []) => {
      const file = `inputs/${label}.txt`;
      writeTree(m.data, { [file]: `new for ${label}` });
      const r = await run('backup-mello.mts', ['--quick', ...args], { ...m.env, ...extra });
      assert.is(r.code, 0, `${label}\n${out(r)}`);
      assert.is((await s3.readObject(USER_FILES, file)).toString(), `new for ${label}`, label);
      return r;
    };
    // The same run without pings, twice: the first sends the tree, the second is the baseline.
    await sendsNew('warm-up', {});
    const baseline = await sendsNew('baseline', {});
    const refused = await sendsNew('refused', { NOTIFY_URL: `http://127.0.0.1:${await closedPort()}/x` });
    assert.match(
      refused.stdout,
      /⚠ notification not sent: \/start ping to NOTIFY_URL \(127\.0\.0\.1:\d+\): ECONNREFUSED/,
      out(refused),
    );
    assert.match(
      refused.stdout,
      /⚠ notification not sent: success ping to NOTIFY_URL \(127\.0\.0\.1:\d+\): ECONNREFUSED/,
      out(refused),
    );
    const hung = await sendsNew('silent', { NOTIFY_URL: `${silent.url}/x` });
    assert.match(hung.stdout, /⚠ notification not sent: \/start ping .*: no answer within 1 s/, out(hung));
    assert.match(hung.stdout, /⚠ notification not sent: success ping .*: no answer within 1 s/, out(hung));
    assert.ok(
      silent.pings.some((p) => p.method === 'POST' && p.body.includes('Backup complete')),
      'the success ping was sent, not answered',
    );
    // COMFYMULTI_NOTIFY_TIMEOUT=1: at most 1 s waiting for /start, 1 s for the end ping.
    for (const r of [refused, hung])
      assert.ok(r.ms < baseline.ms + 3500, `${r.ms} ms against ${baseline.ms} ms without pings`);
    // --json: the warning is among the notices, and stdout is the JSON alone.
    const json = await sendsNew('json', { NOTIFY_URL: `${silent.url}/x` }, ['--json']);
    const summary = JSON.parse(json.stdout);
    assert.is(summary.exitCode, 0);
    assert.ok(
      summary.notices.some((n: string) => /^notification not sent: success ping/.test(n)),
      json.stdout,
    );
  } finally {
    silent.close();
  }
});

test('a run that finds the lock held exits 75 and sends nothing (the holder pings when it ends)', async () => {
  const server = await pingServer();
  try {
    const m = mello('locked', { NOTIFY_URL: `${server.url}/l` });
    fs.mkdirSync(m.state, { recursive: true });
    writeHeldLock(path.join(m.state, 'backup-mello.lock'), 'backup-mello');
    const r = await run('backup-mello.mts', [], m.env);
    assert.is(r.code, 75, out(r));
    await sleep(300);
    assert.equal(brief(server.pings), []);
  } finally {
    server.close();
  }
});

test('a configuration error sends POST /fail saying why (no /start); a mistyped flag sends nothing', async () => {
  const server = await pingServer();
  try {
    const m = mello('config-error', { NOTIFY_URL: `${server.url}/c`, KEEP_BACKUPS: 'ten' });
    const r = await run('backup-mello.mts', [], m.env);
    assert.is(r.code, 2, out(r));
    assert.equal(brief(server.pings), ['POST /c/fail'], out(r));
    assert.match(
      server.pings[0].body,
      /^backup-mello on .+: not started, nothing was done\n✗ KEEP_BACKUPS must be a whole number/,
      server.pings[0].body,
    );
    // The URL in a .env that reads: it is found there too.
    server.pings.length = 0;
    const envFile = path.join(m.root, 'notify.env');
    fs.writeFileSync(
      envFile,
      `NOTIFY_URL=${server.url}/from-env-file\nR2_USER_FILES_ENDPOINT=${s3.endpoint}/bucket-in-path\n`,
    );
    const { NOTIFY_URL: _, KEEP_BACKUPS: __, ...rest } = m.env;
    const fromFile = await run('backup-mello.mts', ['--env-file', envFile], rest);
    assert.is(fromFile.code, 2, out(fromFile));
    assert.equal(brief(server.pings), ['POST /from-env-file/fail'], out(fromFile));
    assert.match(server.pings[0].body, /R2_USER_FILES_ENDPOINT must be http\(s\):\/\/host\[:port\] without a path/);
    server.pings.length = 0;
    const typo = await run('backup-mello.mts', ['--qiuck'], { ...m.env, KEEP_BACKUPS: '3' });
    assert.is(typo.code, 2, out(typo));
    await sleep(300);
    assert.equal(brief(server.pings), []);
  } finally {
    server.close();
  }
});

test('a malformed NOTIFY_URL is exit 2 naming the variable, without repeating its value', async () => {
  const m = mello('bad-url');
  for (const [name, value, said] of [
    ['NOTIFY_URL', 'hc-ping.com/uuid-1', /NOTIFY_URL is not a URL/],
    ['NOTIFY_URL_MELLO', 'https://hc-ping.com/uuid 2', /NOTIFY_URL_MELLO holds whitespace/],
    ['NOTIFY_URL_CRON', 'https://me:pass-3@hc.example/x', /NOTIFY_URL_CRON must not hold a user name or password/],
    ['NOTIFY_URL_VERDA', 'file:///etc/passwd', /NOTIFY_URL_VERDA must be an http\(s\) URL/],
  ] as const) {
    const r = await run('backup-mello.mts', ['--dry-run'], { ...m.env, [name]: value });
    assert.is(r.code, 2, `${name}\n${out(r)}`);
    assert.match(r.stderr, said);
    assert.not.match(r.stderr, /uuid-1|uuid 2|pass-3|passwd/, 'the value is not repeated');
    assert.not.match(r.stderr, /\n\s+at /, 'no stack');
  }
});

test('--dry-run, --verify and --status send no ping', async () => {
  const server = await pingServer();
  try {
    const m = mello('no-ping', { NOTIFY_URL: `${server.url}/n` });
    const good = await run('backup-mello.mts', ['--quick'], m.env);
    assert.is(good.code, 0, out(good));
    server.pings.length = 0;
    for (const flag of ['--dry-run', '--verify', '--status']) {
      const r = await run('backup-mello.mts', ['--quick', flag], m.env);
      assert.is(r.code, 0, `${flag}\n${out(r)}`);
    }
    await sleep(300);
    assert.equal(brief(server.pings), []);
  } finally {
    server.close();
  }
});

test("backup-verda pings NOTIFY_URL_VERDA; nothing of Verda's .env is in the body", async () => {
  const server = await pingServer();
  try {
    const v = makeVerda(path.join(work, 'verda'));
    const state = path.join(work, 'verda', 'state');
    const env = {
      ...v.env,
      ...FAST,
      VERDA_HOST: 'local',
      BACKUP_DIR: path.join(work, 'verda', 'backups'),
      COMFYMULTI_STATE_DIR: state,
      R2_ENDPOINT: s3.endpoint,
      R2_ACCESS_KEY_ID: SECRET,
      R2_SECRET_ACCESS_KEY: SECRET,
      NOTIFY_URL: `${server.url}/general`,
      NOTIFY_URL_MELLO: `${server.url}/mello`,
      NOTIFY_URL_VERDA: `${server.url}/verda`,
    };
    const r = await run('backup-verda.mts', ['--quick'], env);
    assert.is(r.code, 0, out(r));
    assert.equal(brief(server.pings), ['GET /verda/start', 'POST /verda'], out(r));
    const body = server.pings[1].body;
    assert.match(body, /^Step \d+ \(Project \.env\): ✓ project-env-\d{8}-\d{6}\.tar\.gz/m, body);
    for (const secret of [
      ENV_SECRET,
      'hf_fixture_secret_4242',
      'project_secret_9',
      'privkey:abc',
      'PRIVATE HOST KEY',
      'S3RVER',
    ]) {
      assert.not.ok(body.includes(secret), `${secret} is not in the body`);
    }

    // restore-verda backs nothing up: a good drill sends nothing (a success would tell the
    // backup's check that backups are made); a failed one sends POST /fail.
    server.pings.length = 0;
    // Only --quick runs here: no image recorded, so the drill of the config kinds alone.
    const configOnly = ['--only', 'tailscale-identity,ssh-host-keys,fail2ban,ufw,project-env,home-dev,comfy-project'];
    const drill = await run('restore-verda.mts', ['--drill', ...configOnly], env);
    assert.is(drill.code, 0, out(drill));
    assert.equal(brief(server.pings), [], out(drill));
    const archive = fs.readdirSync(env.BACKUP_DIR).filter((n) => n.startsWith('home-dev-'))[0]!;
    fs.appendFileSync(path.join(env.BACKUP_DIR, archive), 'damage');
    const failed = await run('restore-verda.mts', ['--drill', ...configOnly], env);
    assert.is(failed.code, 1, out(failed));
    assert.equal(brief(server.pings), ['POST /verda/fail'], out(failed));
    assert.match(server.pings[0].body, /drill FAILED/);
  } finally {
    server.close();
  }
});

test.run();
