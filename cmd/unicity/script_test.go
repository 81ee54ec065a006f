package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// The CLI scenarios in testdata/script run the real unicity main as a program ("exec
// unicity ..." or just "unicity ..."), so exit codes, stdout and stderr are those a
// technician sees.
//
// Custom commands (add yours to scriptCmds, and document it here):
//
//	status CODE PROGRAM [ARGS...]
//	    run PROGRAM like exec, and fail unless it exits with CODE (the exit-code contract);
//	    stdout and stderr are then checked as usual.
//	swtpm
//	    start a private swtpm for this script, stopped when it ends; sets TPM=swtpm:SOCKET
//	    (for --tpm and config files), SWTPM_SOCK, and TPM2OPENSSL_TCTI/TPM2TOOLS_TCTI for
//	    openssl's tpm2 provider and tpm2-tools. Guard it with "[!swtpm] skip".
//	testca init DIR
//	    make a root CA and a factory intermediate CA in DIR (root.pem, chain.pem with the
//	    intermediate, ca.pem and ca.key for signing).
//	testca sign [-cn CN] [-from RFC3339] [-until RFC3339] DIR CSR OUT
//	    issue a device certificate from the factory CA for the CSR's key into OUT (leaf
//	    only). -cn overrides the CSR's subject; -from/-until set the validity window
//	    (default: now for a year).
//
// Conditions for the external tools a script needs, to write "[!swtpm] skip" first:
// [swtpm] holds when swtpm is installed, [tpm2openssl] when openssl loads the tpm2
// provider. Under UNICITY_TEST_STRICT=1 (CI) they always hold, so a missing tool fails the
// script instead of skipping it.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"unicity": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:       "testdata/script",
		Cmds:      scriptCmds,
		Condition: scriptCondition,
	})
}

var scriptCmds = map[string]func(ts *testscript.TestScript, neg bool, args []string){
	"status": cmdStatus,
	"swtpm":  cmdSWTPM,
	"testca": cmdTestCA,
	// The agent scenarios' commands, documented in agent_script_test.go.
	"emulator":     cmdEmulator,
	"freeport":     cmdFreePort,
	"awaitstatus":  cmdAwaitStatus,
	"statefile":    cmdStateFile,
	"awaitcert":    cmdAwaitCert,
	"awaitrenewal": cmdAwaitRenewal,
	"awaittwin":    cmdAwaitTwin,
	"awaitexpiry":  cmdAwaitExpiry,
	"expand":       cmdExpand,
}

func cmdStatus(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: status CODE PROGRAM [ARGS...]")
	}
	want, err := strconv.Atoi(args[0])
	ts.Check(err)
	got := 0
	if err := ts.Exec(args[1], args[2:]...); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			ts.Fatalf("%s: %v", args[1], err)
		}
		got = ee.ExitCode()
	}
	if got != want {
		ts.Fatalf("%s exited with %d, want %d", args[1], got, want)
	}
}

func cmdSWTPM(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 0 {
		ts.Fatalf("usage: swtpm")
	}
	bin, err := exec.LookPath("swtpm")
	ts.Check(err)
	// Not $WORK: a unix socket path must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "swtpm")
	ts.Check(err)
	p, err := attesttest.Start(bin, dir)
	if err != nil {
		os.RemoveAll(dir)
		ts.Fatalf("swtpm: %v", err)
	}
	ts.Defer(func() {
		p.Stop()
		os.RemoveAll(dir)
	})
	ts.Setenv("TPM", "swtpm:"+p.Addr)
	ts.Setenv("SWTPM_SOCK", p.Addr)
	ts.Setenv("TPM2OPENSSL_TCTI", "swtpm:path="+p.Addr)
	ts.Setenv("TPM2TOOLS_TCTI", "swtpm:path="+p.Addr)
}

func cmdTestCA(ts *testscript.TestScript, neg bool, args []string) {
	if neg {
		ts.Fatalf("unsupported: ! testca")
	}
	if len(args) == 0 {
		ts.Fatalf("usage: testca init DIR | testca sign [-cn CN] [-from T] [-until T] DIR CSR OUT")
	}
	switch args[0] {
	case "init":
		if len(args) != 2 {
			ts.Fatalf("usage: testca init DIR")
		}
		dir := ts.MkAbs(args[1])
		ts.Check(os.MkdirAll(dir, 0o755))
		root, err := pki.NewRoot("unicity test root")
		ts.Check(err)
		ica, err := root.NewIntermediate("unicity test factory CA")
		ts.Check(err)
		ts.Check(ica.Save(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key")))
		ts.Check(certcodec.WriteCertificates(filepath.Join(dir, "root.pem"), root.Certificate))
		ts.Check(certcodec.WriteCertificates(filepath.Join(dir, "chain.pem"), ica.Certificate))
	case "sign":
		fs := flag.NewFlagSet("testca sign", flag.ContinueOnError)
		cn := fs.String("cn", "", "subject CN instead of the CSR's")
		from := fs.String("from", "", "NotBefore, RFC 3339")
		until := fs.String("until", "", "NotAfter, RFC 3339")
		ts.Check(fs.Parse(args[1:]))
		if fs.NArg() != 3 {
			ts.Fatalf("usage: testca sign [-cn CN] [-from T] [-until T] DIR CSR OUT")
		}
		dir, csrPath, out := ts.MkAbs(fs.Arg(0)), ts.MkAbs(fs.Arg(1)), ts.MkAbs(fs.Arg(2))
		ca, err := pki.LoadCA(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key"))
		ts.Check(err)
		block, _ := pem.Decode([]byte(ts.ReadFile(csrPath)))
		if block == nil {
			ts.Fatalf("%s: no PEM CSR", csrPath)
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		ts.Check(err)
		if *cn != "" {
			csr.Subject.CommonName = *cn
		}
		var opts []pki.Option
		if *from != "" || *until != "" {
			nb, na := time.Now().Add(-time.Hour), time.Now().AddDate(1, 0, 0)
			if *from != "" {
				nb, err = time.Parse(time.RFC3339, *from)
				ts.Check(err)
			}
			if *until != "" {
				na, err = time.Parse(time.RFC3339, *until)
				ts.Check(err)
			}
			opts = append(opts, pki.WithValidity(nb, na))
		}
		leaf, err := ca.SignCSR(csr, opts...)
		ts.Check(err)
		ts.Check(certcodec.WriteCertificates(out, leaf.Certificate()))
	default:
		ts.Fatalf("testca: unknown subcommand %q", args[0])
	}
}

func scriptCondition(cond string) (bool, error) {
	switch cond {
	case "swtpm":
		_, err := exec.LookPath("swtpm")
		return err == nil || attesttest.Strict(), nil
	case "tpm2openssl":
		return hasTPM2Provider() || attesttest.Strict(), nil
	}
	return false, fmt.Errorf("unknown condition %q", cond)
}

// hasTPM2Provider looks for tpm2-openssl's module; loading it would need a TPM already.
func hasTPM2Provider() bool {
	out, err := exec.Command("openssl", "version", "-m").Output()
	if err != nil {
		return false
	}
	_, dir, ok := strings.Cut(strings.TrimSpace(string(out)), `"`)
	if !ok {
		return false
	}
	_, err = os.Stat(filepath.Join(strings.TrimSuffix(dir, `"`), "tpm2.so"))
	return err == nil
}
