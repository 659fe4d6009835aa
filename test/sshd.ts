// A real OpenSSH server on a loopback port, with throwaway host and user keys, and an ssh
// config naming it as given hosts (`verda`, `mello`). Its log counts the connections made.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { tempDir } from './helpers.ts';

export interface Sshd {
  port: number;
  dir: string;
  /** ssh client config file naming the hosts; pass as SSH_CONFIG. */
  config: string;
  /** Connections accepted so far (authenticated logins, from the server's log). */
  connections(): number;
  /** The sshd processes serving a connection now (children of the listener), by pid. */
  sessions(): number[];
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

function keygen(file: string) {
  const r = spawnSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', file], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ssh-keygen: ${r.stderr}`);
}

/** `extraConfig`: more sshd_config lines (e.g. `SetEnv` for what a forced command runs). */
export async function startSshd(hostNames: string[], extraConfig: string[] = []): Promise<Sshd> {
  const dir = tempDir('sshd');
  fs.chmodSync(dir, 0o700);
  const port = await freePort();
  keygen(path.join(dir, 'host_key'));
  keygen(path.join(dir, 'user_key'));
  fs.copyFileSync(path.join(dir, 'user_key.pub'), path.join(dir, 'authorized_keys'));
  fs.mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  const log = path.join(dir, 'sshd.log');
  const user = process.env.USER || 'root';
  fs.writeFileSync(
    path.join(dir, 'sshd_config'),
    [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${dir}/host_key`,
      `AuthorizedKeysFile ${dir}/authorized_keys`,
      `PidFile ${dir}/sshd.pid`,
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PermitRootLogin prohibit-password',
      'StrictModes no',
      'UsePAM no',
      'LogLevel VERBOSE',
      'MaxSessions 50',
      'MaxStartups 50',
      'AcceptEnv LANG',
      'Subsystem sftp internal-sftp',
      ...extraConfig,
      '',
    ].join('\n'),
  );
  const hostKey = fs.readFileSync(path.join(dir, 'host_key.pub'), 'utf8').trim().split(' ').slice(0, 2).join(' ');
  fs.writeFileSync(path.join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${hostKey}\n`);
  const config = path.join(dir, 'ssh_config');
  fs.writeFileSync(
    config,
    hostNames
      .map((name) =>
        [
          `Host ${name}`,
          '  HostName 127.0.0.1',
          `  Port ${port}`,
          `  User ${user}`,
          `  IdentityFile ${dir}/user_key`,
          '  IdentitiesOnly yes',
          `  UserKnownHostsFile ${dir}/known_hosts`,
          '  StrictHostKeyChecking yes',
          '  LogLevel ERROR',
          '',
        ].join('\n'),
      )
      .join('\n'),
  );
  const sshd: ChildProcess = spawn('/usr/sbin/sshd', ['-D', '-f', path.join(dir, 'sshd_config'), '-E', log], {
    stdio: 'ignore',
  });
  // Ready when it accepts a TCP connection.
  for (let i = 0; ; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (up) break;
    if (i > 100 || sshd.exitCode !== null)
      throw new Error(`sshd did not start: ${fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : ''}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    dir,
    config,
    connections: () =>
      fs.existsSync(log) ? (fs.readFileSync(log, 'utf8').match(/Accepted publickey/g) ?? []).length : 0,
    sessions: () => sshdChildren(Number(fs.readFileSync(path.join(dir, 'sshd.pid'), 'utf8'))),
    async stop() {
      sshd.kill('SIGTERM');
      await new Promise((r) => (sshd.exitCode !== null ? r(null) : sshd.once('exit', r)));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Every process under `listener` that is an sshd (the per-connection ones). */
function sshdChildren(listener: number): number[] {
  const found: number[] = [];
  const visit = (pid: number) => {
    const kids = spawnSync('pgrep', ['-P', String(pid)], { encoding: 'utf8' })
      .stdout.split('\n')
      .filter(Boolean)
      .map(Number);
    for (const kid of kids) {
      let comm = '';
      try {
        comm = fs.readFileSync(`/proc/${kid}/comm`, 'utf8').trim();
      } catch {
        continue; // gone meanwhile
      }
      if (comm === 'sshd') found.push(kid);
      visit(kid);
    }
  };
  visit(listener);
  return found;
}
