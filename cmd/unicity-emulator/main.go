// Command unicity-emulator serves an emulated Azure DPS and IoT Hub over MQTT 3.1.1 (TLS and
// WebSocket) for demos, CI and factory lines, and operates the running emulator: list
// devices, read telemetry, send cloud-to-device messages, invoke methods, patch twins,
// disable, delete and move devices, enroll more. The services are dps/dpstest and
// hub/hubtest; this command owns only the files in its directory, the flags and the local
// admin socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(report(err, os.Stderr))
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

// env is what a command may touch of the process.
type env struct {
	stdout, stderr io.Writer
}

func commands() []command {
	return []command{
		{"init", "write a server PKI and a factory CA enrolled as a group enrollment", runInit},
		{"serve", "serve DPS and IoT Hub; print one JSON line once listening", runServe},
		{"sign", "sign a device CSR with the factory CA", runSign},
		{"devices", "list the devices of every hub", runDevices},
		{"telemetry", "print the telemetry received", runTelemetry},
		{"c2d", "send a cloud-to-device message", runC2D},
		{"invoke", "invoke a direct method and print the device's answer", runInvoke},
		{"twin", "print a device twin, or patch its desired properties", runTwin},
		{"disable", "disable (or re-enable) a device on its hub", runDisable},
		{"delete", "delete a device from its hub", runDelete},
		{"move", "move a device to another hub", runMove},
		{"enroll", "add a DPS enrollment", runEnroll},
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdout: stdout, stderr: stderr}
	cmds := commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		w := stdout
		if len(args) == 0 {
			w = stderr
		}
		fmt.Fprintf(w, "Usage: unicity-emulator <command> --dir DIR [flags]\n\nCommands:\n")
		for _, c := range cmds {
			fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
		}
		fmt.Fprintf(w, "\nRun 'unicity-emulator <command> --help' for a command's flags.\n")
		if len(args) == 0 {
			return usageErrorf("missing command")
		}
		return nil
	}
	for _, c := range cmds {
		if c.name == args[0] {
			return c.run(ctx, e, args[1:])
		}
	}
	return usageErrorf("unknown command %q (run 'unicity-emulator --help')", args[0])
}

// newFlags returns a command's flag set with the --dir flag every command requires. Parse
// errors are reported by parse, not by the flag package, so that help goes to stdout and
// mistakes to stderr.
func newFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet("unicity-emulator "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("dir", "", "emulator `directory` (written by init)")
	return fs, dir
}

// parse parses args; --help prints the command's flags on stdout and ends it with success.
func parse(e *env, fs *flag.FlagSet, usage string, args []string) error {
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		printUsage(e.stdout, fs, usage)
		return flag.ErrHelp
	}
	switch {
	case err != nil:
	case fs.NArg() > 0:
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case fs.Lookup("dir").Value.String() == "":
		err = errors.New("--dir is required")
	}
	if err != nil {
		printUsage(e.stderr, fs, usage)
		return usageErrorf("%s: %v", fs.Name(), err)
	}
	return nil
}

func printUsage(w io.Writer, fs *flag.FlagSet, usage string) {
	fmt.Fprintf(w, "Usage: %s %s\n\nFlags:\n", fs.Name(), usage)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// multiFlag collects a repeatable flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// usageError marks a mistake in the command line: exit code 2.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, a ...any) error {
	return &usageError{fmt.Errorf(format, a...)}
}

// exitCode: 0 for success and --help, 2 for usage errors, 1 for everything else.
func exitCode(err error) int {
	var ue *usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		return 2
	}
	return 1
}

func report(err error, stderr io.Writer) int {
	code := exitCode(err)
	if code != 0 {
		fmt.Fprintf(stderr, "unicity-emulator: %v\n", err)
	}
	return code
}
