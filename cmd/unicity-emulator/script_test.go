package main

import (
	"os"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
)

// The scenarios in testdata/script run the real unicity-emulator main as a program, so they
// show what an operator types and sees.
//
// Custom commands:
//
//	waitsock PATH
//	    wait (up to 30 s) until PATH exists: the admin socket of a serve started with '&'.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"unicity-emulator": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"waitsock": cmdWaitSock,
		},
	})
}

func cmdWaitSock(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: waitsock PATH")
	}
	path := ts.MkAbs(args[0])
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			ts.Fatalf("%s did not appear", path)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
