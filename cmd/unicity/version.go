package main

import (
	"context"
	"errors"
	"flag"
	"fmt"

	"github.com/unicity-iot/unicity/internal/cli"
	"github.com/unicity-iot/unicity/internal/version"
)

func runVersion(_ context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "version", "")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	_, err := fmt.Fprintln(e.stdout, version.String("unicity"))
	return err
}

// newFlagSet returns a flag set that reports parse errors as usage errors and prints its
// help to stdout when asked for it (so `--help | less` works).
func newFlagSet(e *env, name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: unicity %s %s\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args and turns a malformed command line into a usage error (exit 2).
func parseFlags(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		return &cli.UsageError{Err: err}
	}
	return err
}
