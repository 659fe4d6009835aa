// Unit tests of lib/layout.ts, the one place the archive layouts are enforced, and of the other
// defences against what Verda sends (printable text, bounded output, the models answer). Archives
// are made here: by GNU tar (what an honest Verda sends, in its three formats) and by tar-stream
// (what a hostile one could send). No server: milliseconds.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { printable } from '../lib/cli.ts';
import { ByteBudget, LayoutError, TarGuard, checkArchiveFile, isEssential } from '../lib/layout.ts';
import { answerProblem } from '../lib/models.ts';
import { recordProblem } from '../lib/manifest.ts';
import { LocalHost, OUTPUT_LIMIT, OutputTooLarge } from '../lib/ssh.ts';
import { pingBody } from '../lib/notify.ts';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'cms-layout-'));

type Entry = Partial<tar.Header> & { name: string; body?: string };

/** A tar stream of these entries, as tar-stream writes it (ustar, pax for long names). */
async function pack(entries: Entry[]): Promise<Buffer> {
  const p = tar.pack();
  const chunks: Buffer[] = [];
  p.on('data', (c) => void chunks.push(c as Buffer));
  const ended = new Promise<void>((resolve) => p.on('end', () => resolve()));
  for (const { body, ...header } of entries) {
    await new Promise<void>((resolve, reject) =>
      p.entry({ mode: 0o644, mtime: new Date(0), ...header }, body ?? '', (e) => (e ? reject(e) : resolve())),
    );
  }
  p.finalize();
  await ended;
  return Buffer.concat(chunks);
}

/** The guard over `data` fed in odd-sized chunks: its output, result, or error. */
async function guard(kind: string, data: Buffer, budget?: ByteBudget) {
  const g = new TarGuard(kind, budget);
  const out: Buffer[] = [];
  g.on('data', (c: Buffer) => out.push(c));
  const done = new Promise<void>((resolve, reject) => {
    g.on('end', resolve);
    g.on('error', reject);
  });
  for (let at = 0; at < data.length; at += 777) g.write(data.subarray(at, at + 777));
  g.end();
  try {
    await done;
    return { output: Buffer.concat(out), result: g.result, error: undefined };
  } catch (e) {
    return { output: Buffer.concat(out), result: g.result, error: e as Error };
  }
}

/** A tree made with GNU tar, listed back by GNU tar. */
const tarList = (data: Buffer) =>
  spawnSync('tar', ['-tf', '-'], { input: data, encoding: 'utf8' }).stdout.split('\n').filter(Boolean);

test('an honest GNU tar stream passes whole (gnu, posix and ustar formats; long and non-UTF-8 names; hard links)', async () => {
  const dir = tmp();
  const src = path.join(dir, 'home');
  const long = path.join('x'.repeat(80), 'y'.repeat(90));
  fs.mkdirSync(path.join(src, long), { recursive: true });
  fs.writeFileSync(path.join(src, long, 'z'.repeat(60)), 'long');
  fs.writeFileSync(path.join(src, 'f'), 'hi');
  fs.linkSync(path.join(src, 'f'), path.join(src, 'hard'));
  fs.symlinkSync('/etc', path.join(src, 'link'));
  fs.writeFileSync(Buffer.from(path.join(src, 'caf\xe9.txt'), 'latin1'), 'latin1 name');
  for (const format of ['gnu', 'posix', 'ustar']) {
    const made = spawnSync('tar', [`--format=${format}`, '-C', src, '--sort=name', '-cf', '-', '.'], {
      maxBuffer: 1 << 24,
    });
    if (format === 'ustar') continue; // ustar cannot hold the long name; gnu and posix can
    assert.is(made.status, 0, `${format}: ${made.stderr}`);
    const { output, result, error } = await guard('home-dev', made.stdout);
    assert.is(error, undefined, `${format}: ${error?.message}`);
    assert.equal(tarList(output), tarList(made.stdout), format);
    assert.is(result.entries, tarList(made.stdout).length, format);
    // What passes is the stream itself, byte for byte, up to its end marker.
    assert.ok(made.stdout.subarray(0, output.length - 1024).equals(output.subarray(0, output.length - 1024)));
  }
});

test('identity kinds: only their sources; the first entry outside fails, named', async () => {
  const keys = await pack([
    { name: 'etc/ssh/ssh_host_ed25519_key', body: 'KEY', mode: 0o600 },
    { name: 'etc/ssh/ssh_host_ed25519_key.pub', body: 'PUB' },
  ]);
  assert.is((await guard('ssh-host-keys', keys)).error, undefined);
  const cases: [string, Entry[], RegExp][] = [
    [
      'ssh-host-keys',
      [{ name: 'etc/cron.d/evil', body: '* * * * * root id' }],
      /etc\/cron\.d\/evil: not part of the ssh-host-keys layout/,
    ],
    ['ssh-host-keys', [{ name: 'root/.ssh/authorized_keys', body: 'ssh-ed25519 X' }], /root\/\.ssh\/authorized_keys/],
    ['ssh-host-keys', [{ name: 'etc/ssh/sshd_config', body: 'PermitRootLogin yes' }], /sshd_config/],
    [
      'ssh-host-keys',
      [{ name: 'etc/ssh/ssh_host_x_key', type: 'symlink', linkname: '/etc/shadow' }],
      /a symlink, not part/,
    ],
    ['tailscale-identity', [{ name: 'tailscale/../../etc/passwd', body: 'x' }], /a name with "\.\."/],
    ['tailscale-identity', [{ name: '/var/lib/tailscale/x', body: 'x' }], /an absolute name/],
    ['project-env', [{ name: '.env', type: 'directory' }], /\.env: not part of the project-env layout/],
    ['ufw', [{ name: 'etc/ufw/before.rules', body: 'x' }], /before\.rules/],
    ['fail2ban', [{ name: 'etc/fail2ban/jail.d/../action.d/x', body: 'x' }], /".."/],
    ['ohmyzsh-custom', [{ name: 'custom/plugin', type: 'symlink', linkname: '/root' }], /a symlink, not part/],
    [
      'home-dev',
      [
        { name: './a', type: 'symlink', linkname: '/etc' },
        { name: './a/cron.d/x', body: 'x' },
      ],
      /beneath \.\/a|beneath a, a symlink/,
    ],
    ['home-dev', [{ name: './h', type: 'link', linkname: '/etc/shadow' }], /an absolute name/],
    ['home-dev', [{ name: './h', type: 'link', linkname: 'not-in-archive' }], /not earlier in the archive/],
    [
      'home-dev',
      [
        { name: './d', type: 'directory', size: 0 },
        { name: './x', type: 'symlink', linkname: 'y', size: 0 },
        { name: './x/y', body: 'z' },
      ],
      /beneath/,
    ],
  ];
  for (const [kind, entries, want] of cases) {
    const { error, output } = await guard(kind, await pack(entries));
    assert.instance(error, LayoutError, `${kind} ${entries[0].name}`);
    assert.match(error!.message, want);
    // Nothing of a refused entry passed (a stream cut before it is no archive either).
    assert.not.ok(output.includes(Buffer.from('evil')) && output.includes(Buffer.from('root id')));
  }
});

test('home-dev and comfy-project: symlinks kept, a FIFO or device left out with a warning naming it', async () => {
  const data = await pack([
    { name: './', type: 'directory' },
    { name: './link', type: 'symlink', linkname: '/etc' },
    { name: './fifo', type: 'fifo' },
    { name: './tty', type: 'character-device', devmajor: 5, devminor: 0 },
    { name: './notes.txt', body: 'kept' },
  ]);
  for (const kind of ['home-dev', 'comfy-project']) {
    const { error, output, result } = await guard(kind, data);
    assert.is(error, undefined);
    assert.equal(tarList(output), ['./', './link', './notes.txt']);
    assert.is(result.dropped.length, 2);
    assert.match(result.dropped.join('\n'), /\.\/fifo: a FIFO, left out/);
    assert.match(result.dropped.join('\n'), /\.\/tty: a device, left out/);
  }
  assert.instance(
    (await guard('tailscale-identity', await pack([{ name: 'tailscale/fifo', type: 'fifo' }]))).error,
    LayoutError,
  );
});

test('a stream that is not a whole, single tar archive is refused', async () => {
  const good = await pack([{ name: '.env', body: 'A=1' }]);
  const truncated = good.subarray(0, 700);
  assert.match((await guard('project-env', truncated)).error!.message, /truncated|ends inside/);
  const trailing = Buffer.concat([good, await pack([{ name: 'etc/cron.d/x', body: 'x' }])]);
  assert.match((await guard('project-env', trailing)).error!.message, /after the end/);
  const bad = Buffer.from(good);
  bad[10] ^= 0xff; // in the name: the checksum no longer matches
  assert.match((await guard('project-env', bad)).error!.message, /checksum/);
  assert.instance((await guard('project-env', Buffer.from('tar: --help usage text'.padEnd(1024)))).error, LayoutError);
});

test('a pax path decides the name: a harmless header name cannot hide a path outside the layout', async () => {
  const data = await pack([{ name: 'custom/' + 'a'.repeat(120) + '/../../../etc/x', body: 'x' }]);
  const { error } = await guard('ohmyzsh-custom', data);
  assert.match(error!.message, /".."/);
});

test('ByteBudget: the drill stops past DRILL_MAX_BYTES, counted as the stream passes', async () => {
  const big = await pack([{ name: './big', body: 'x'.repeat(100_000) }]);
  const budget = new ByteBudget(50_000, 'DRILL_MAX_BYTES');
  const { error, output } = await guard('home-dev', big, budget);
  assert.match(error!.message, /DRILL_MAX_BYTES \(50000 bytes\)/);
  assert.ok(output.length <= 50_000);
  assert.is((await guard('home-dev', big, new ByteBudget(1 << 20, 'DRILL_MAX_BYTES'))).error, undefined);
});

test('checkArchiveFile reads a .tar.gz through its kind', async () => {
  const dir = tmp();
  const file = path.join(dir, 'ssh-host-keys-20260101-000000.tar.gz');
  fs.writeFileSync(file, zlib.gzipSync(await pack([{ name: 'etc/ssh/ssh_host_rsa_key', body: 'K' }])));
  assert.equal(await checkArchiveFile(file, 'ssh-host-keys'), { entries: 1, dropped: [] });
  fs.writeFileSync(file, zlib.gzipSync(await pack([{ name: 'root/.ssh/authorized_keys', body: 'K' }])));
  await checkArchiveFile(file, 'ssh-host-keys').then(
    () => assert.unreachable('accepted'),
    (e) => assert.instance(e, LayoutError),
  );
});

test('essential files: the identity each kind exists for', () => {
  assert.ok(isEssential('tailscale-identity', 'tailscale/tailscaled.state'));
  assert.ok(isEssential('tailscale-identity', 'tailscale'));
  assert.not.ok(isEssential('tailscale-identity', 'tailscale/derpmap.cached.json'));
  assert.ok(isEssential('ssh-host-keys', 'etc/ssh/ssh_host_ed25519_key'));
  assert.not.ok(isEssential('ssh-host-keys', 'etc/ssh/ssh_host_ed25519_key.pub'));
  assert.ok(isEssential('project-env', '.env'));
  assert.ok(isEssential('ufw', 'etc/ufw/user6.rules'));
  assert.not.ok(isEssential('ufw', 'lib/ufw/user.rules'));
  assert.not.ok(isEssential('home-dev', './.ssh/id_ed25519'));
});

test('printable: control characters, C1, bidi and zero-width characters escaped; the rest kept', () => {
  assert.is(printable('a\nb'), 'a\\nb');
  assert.is(printable('\x1b[2J\x07'), '\\u001b[2J\\u0007');
  assert.is(printable('\x9b31m'), '\\u009b31m');
  assert.is(printable('abc\u202edcba'), 'abc\\u202edcba');
  assert.is(printable('ünï 日本 ✓'), 'ünï 日本 ✓');
  const body = pingBody(['ok', 'forged\n=== Backup complete ===']);
  assert.is(body.split('\n').filter((l) => l.startsWith('===')).length, 0);
});

test('a command printing without end is stopped past OUTPUT_LIMIT, with a named error, in bounded time', async () => {
  const host = new LocalHost([], 10_000);
  const started = Date.now();
  await host.$`sh -c ${'yes "$(printf "\\033[2J%.0s" 1 2 3)"'}`.then(
    () => assert.unreachable('collected'),
    (e) => {
      assert.instance(e, OutputTooLarge);
      assert.match(e.message, /more than 4 MiB/);
    },
  );
  assert.ok(Date.now() - started < 5000);
  assert.is(OUTPUT_LIMIT, 4 * 1024 * 1024);
  // stderr lines reach the callback whole, each bounded
  const lines: string[] = [];
  await host.$({
    onStderr: (l) => lines.push(l),
  })`sh -c ${'head -c 100000 /dev/zero | tr "\\0" x >&2; printf "\\nnext\\n" >&2'}`;
  assert.equal(
    lines.map((l) => l.length),
    [4097, 4],
  );
});

test('the models answer: a model recorded without a sha256 or size, or outside the models, is refused', () => {
  const ok = {
    files: 1,
    bytes: 5,
    sent: 1,
    sentBytes: 5,
    skipped: 0,
    adopted: 0,
    failureCount: 0,
    failures: [],
    vanished: [],
    actions: [
      { action: 'send' as const, key: 'a/m.safetensors', bytes: 5, sha256: 'a'.repeat(64), reason: 'new' as const },
    ],
  };
  assert.is(answerProblem(ok), undefined);
  const without = { ...ok, actions: [{ action: 'send', key: 'a/m.safetensors', bytes: 5, reason: 'new' }] };
  assert.match(answerProblem(without as never)!, /recorded as sent without a sha256/);
  const sizeless = { ...ok, actions: [{ ...ok.actions[0], bytes: undefined }] };
  assert.match(answerProblem(sizeless as never)!, /without a size/);
  const outside = { ...ok, actions: [{ ...ok.actions[0], key: '../../etc/x.safetensors' }] };
  assert.match(answerProblem(outside)!, /not a model under the models directory/);
  assert.match(answerProblem({ ...ok, sent: 2 })!, /records 1 models, not the 2/);
  assert.match(recordProblem({ key: 'm', bytes: 1 })!, /no sha256/);
  assert.is(recordProblem({ key: 'm', bytes: 1, sha256: 'b'.repeat(64) }), undefined);
});

test.run();
