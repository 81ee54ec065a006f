// Package cli is the command-line frame shared by unicity's binaries: a tree of
// sub-commands with one-line summaries, help at every level (on stdout when asked for, on
// stderr after a mistake), and usage errors, which the binaries turn into exit status 2.
// Flags, output and the other exit codes stay with each binary.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// Command is one verb. A group (such as `unicity factory`) has Sub instead of Run. E is what
// the binary hands its commands: its streams, for instance.
type Command[E any] struct {
	Name    string
	Summary string
	Run     func(ctx context.Context, e E, args []string) error
	Sub     []Command[E]
}

// UsageError is a mistake in the command line.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef returns a *UsageError.
func Usagef(format string, a ...any) error {
	return &UsageError{fmt.Errorf(format, a...)}
}

// IsUsage reports whether err is, or wraps, a usage error.
func IsUsage(err error) bool {
	var ue *UsageError
	return errors.As(err, &ue)
}

// Dispatch runs the command that args name below path (the program name, or the words typed
// so far). With no arguments it prints the list and fails; with -h, --help or help it
// prints the list and succeeds.
func Dispatch[E any](ctx context.Context, e E, stdout, stderr io.Writer, path string, cmds []Command[E], args []string) error {
	if len(args) == 0 {
		printList(stderr, path, cmds)
		return Usagef("missing command")
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printList(stdout, path, cmds)
		return nil
	}
	for _, c := range cmds {
		if c.Name != args[0] {
			continue
		}
		if c.Sub != nil {
			return Dispatch(ctx, e, stdout, stderr, path+" "+c.Name, c.Sub, args[1:])
		}
		return c.Run(ctx, e, args[1:])
	}
	printList(stderr, path, cmds)
	return Usagef("unknown command %q (see '%s --help')", args[0], path)
}

func printList[E any](w io.Writer, path string, cmds []Command[E]) {
	width := 0
	for _, c := range cmds {
		width = max(width, len(c.Name))
	}
	fmt.Fprintf(w, "Usage: %s <command> [flags]\n\nCommands:\n", path)
	for _, c := range cmds {
		fmt.Fprintf(w, "  %-*s  %s\n", width, c.Name, c.Summary)
	}
	fmt.Fprintf(w, "\nRun '%s <command> --help' for a command's flags.\n", path)
}
