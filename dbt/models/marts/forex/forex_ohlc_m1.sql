{{ forex_ohlc('m1') }}
