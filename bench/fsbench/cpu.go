package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// atClockTick is AT_CLKTCK, the auxiliary vector entry that holds the
// kernel's USER_HZ: the unit of the CPU times in /proc/PID/stat. It is what
// sysconf(_SC_CLK_TCK) returns.
const atClockTick = 17

// clockTick is the length of one tick of /proc/PID/stat's CPU times: from
// AT_CLKTCK where the auxiliary vector can be read, else 100 Hz, USER_HZ on
// every Linux architecture Go runs on.
var clockTick = sync.OnceValue(func() time.Duration {
	hz := uintptr(100)
	if auxv, err := unix.Auxv(); err == nil {
		for _, kv := range auxv {
			if kv[0] == atClockTick && kv[1] > 0 {
				hz = kv[1]
			}
		}
	}
	return time.Second / time.Duration(hz)
})

// cpuTime returns the CPU time the daemon process has used so far, user and
// system, across all its threads (utime and stime, fields 14 and 15 of
// /proc/PID/stat). The resolution is one clock tick, 10 ms at 100 Hz.
func (d *daemon) cpuTime() (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", d.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("read %s's CPU time: %w", d.name, err)
	}
	return parseStatCPU(string(data))
}

// parseStatCPU returns utime+stime from the content of a /proc/PID/stat.
// The second field, the command name in parentheses, may hold spaces and
// parentheses itself, so fields are counted from the last ')': the state,
// field 3, comes first after it.
func parseStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/PID/stat: no ')' after the command name in %q", stat)
	}
	f := strings.Fields(stat[i+1:])
	const utime, stime = 14 - 3, 15 - 3
	if len(f) <= stime {
		return 0, fmt.Errorf("parse /proc/PID/stat: %d fields after the command name, want more than %d", len(f), stime)
	}
	var ticks uint64
	for _, s := range []string{f[utime], f[stime]} {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc/PID/stat: CPU time %q: %w", s, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick(), nil
}
